"""The rollout inspection server (`vlrl serve`), its web page, and the run report (`vlrl report`).

Imported only by those commands: the training path never loads FastAPI."""

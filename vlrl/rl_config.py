"""Typed configuration of the RL algorithm: advantages, policy loss, KL, entropy,
rollout/training mismatch, dynamic sampling and the update schedule.

This module imports only pydantic (no torch, no verl), so the recipe schema in the
kernel can embed `RLAlgoConfig` and `vlrl validate` checks it without loading a trainer.

Estimator and loss names are checked against the names verl 0.9.1 registers (plus our
own, see `rlhf/advantages.py` and `rlhf/losses.py`). The lists are static so that
validation needs no verl import; a test compares them with verl's live registries, so an
upgrade that adds or drops a name fails the suite instead of drifting silently.

Presets: `RLAlgoConfig.dr_grpo(max_response_tokens)` and `RLAlgoConfig.dapo()` spell out
how those papers map onto the fields (see docs/rl-algorithms.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Advantage estimators usable without a critic. verl 0.9.1 also registers "gae", which
# needs a value model; vlrl has none, so it is left out on purpose.
VERL_ESTIMATORS = (
    "grpo",
    "grpo_vectorized",
    "gdpo",
    "grpo_passk",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
    "rloo",
    "rloo_vectorized",
    "opo",
    "gpg",
    "optimal_token_baseline",
    "tir_optimal_token_baseline",
)
VLRL_ESTIMATORS = ("vlrl_grpo_batch_std",)
ESTIMATORS = VERL_ESTIMATORS + VLRL_ESTIMATORS

VERL_LOSSES = (
    "vanilla",
    "dppo_tv",
    "dppo_kl",
    "gspo",
    "sapo",
    "gpg",
    "clip_cov",
    "kl_cov",
    "geo_mean",
    "dro",
    "cispo",
    "bypass_mode",
)
VLRL_LOSSES = ("vlrl_seq_mask",)
LOSSES = VERL_LOSSES + VLRL_LOSSES

AggMode = Literal["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = AggMode.__args__  # type: ignore[attr-defined]

# KL estimators of verl.trainer.ppo.core_algos.kl_penalty. A trailing "+" keeps the
# estimator's value but takes the gradient of k2 (straight-through), which is unbiased.
KLKind = Literal["k1", "k2", "k3", "kl", "abs", "mse", "low_var_kl", "k1+", "k3+", "kl+", "abs+", "low_var_kl+"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdvantageConfig(_Strict):
    """How sequence rewards become per-token advantages (through verl's registry)."""

    estimator: str = Field("grpo", description="registered estimator name; see ESTIMATORS")
    norm_by_std: bool = Field(True, description="divide by the std (GRPO); false = Dr.GRPO's mean-only baseline")
    epsilon: float = Field(1e-6, gt=0, description="added to the std before dividing")
    gamma: float = Field(1.0, ge=0, le=1, description="discount, used by reinforce_plus_plus only")
    gdpo_components: list[str] | None = Field(None, description="gdpo: reward components normalised one by one")
    gdpo_weights: list[float] | None = Field(None, description="gdpo: weight per component (default equal)")

    @field_validator("estimator")
    @classmethod
    def _known(cls, v: str) -> str:
        if v == "gae":
            raise ValueError("'gae' needs a critic (value model), which vlrl does not train; use grpo, rloo or reinforce_plus_plus_baseline")
        if v not in ESTIMATORS:
            raise ValueError(f"unknown advantage estimator {v!r}; known: {', '.join(ESTIMATORS)}")
        return v

    @model_validator(mode="after")
    def _gdpo(self) -> "AdvantageConfig":
        if self.gdpo_weights is not None and (self.gdpo_components is None or len(self.gdpo_weights) != len(self.gdpo_components)):
            raise ValueError("gdpo_weights needs one weight per entry of gdpo_components")
        return self


class LossConfig(_Strict):
    """The policy-gradient loss (through verl's registry) and how it is aggregated."""

    name: str = Field("vanilla", description="registered policy loss; see LOSSES")
    agg_mode: AggMode = Field("token-mean", description="how the (B, T) loss matrix becomes a scalar")
    clip_ratio_low: float = Field(0.2, ge=0, lt=1, description="PPO clip: ratio floor is 1 - clip_ratio_low")
    clip_ratio_high: float = Field(0.2, ge=0, description="PPO clip: ratio ceiling is 1 + clip_ratio_high (DAPO clip-higher: 0.28)")
    dual_clip_c: float | None = Field(3.0, gt=1, description="dual clip: loss of negative-advantage tokens capped at -c*A; null = off")
    loss_scale_factor: int | None = Field(
        None, ge=1, description="seq-mean-token-sum-norm divisor; set it to the max response length (Dr.GRPO) so it does not follow padding"
    )
    sapo_tau_pos: float = Field(1.0, gt=0, description="sapo: gate temperature for positive advantages")
    sapo_tau_neg: float = Field(1.05, gt=0, description="sapo: gate temperature for negative advantages")
    clip_cov_ratio: float = Field(0.0002, gt=0, description="clip_cov: share of tokens whose gradient is cut")
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = Field(0.0002, gt=0, description="kl_cov: share of tokens that get the |log ratio| penalty")
    kl_cov_coef: float = Field(0.1, ge=0, description="kl_cov: coefficient of that penalty")
    dro_beta: float | None = Field(None, gt=0, description="dro: quadratic log-ratio penalty (required for dro)")
    seq_mask_delta: float = Field(
        0.1, gt=0, description="vlrl_seq_mask: drop a negative-advantage sequence whose mean log(old/new) exceeds this"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown policy loss {v!r}; known: {', '.join(LOSSES)}")
        return v

    @model_validator(mode="after")
    def _needs(self) -> "LossConfig":
        if self.name == "dro" and self.dro_beta is None:
            raise ValueError("loss 'dro' needs dro_beta (e.g. 0.1)")
        return self


class KLConfig(_Strict):
    """KL(policy || reference) in the loss, with a fixed, adaptive or GRPO-D coefficient.

    The coefficient is state the controller carries from step to step (`rlhf.kl`)."""

    kind: KLKind = Field("k3", description="estimator: k1, k2, k3 (= low_var_kl), abs; '+' = k2 gradient")
    controller: Literal["fixed", "adaptive", "dynamic"] = Field("fixed", description="dynamic = GRPO-D schedule")
    coef: float = Field(0.0, ge=0, description="fixed: the coefficient; adaptive: its start value; 0 with fixed = no KL term")
    target_kl: float = Field(0.1, gt=0, description="adaptive: KL the controller steers to")
    horizon: int = Field(10000, ge=1, description="adaptive: samples over which the error is corrected")
    beta_min: float = Field(0.0, ge=0, description="dynamic: coefficient at the end of warm-up")
    beta_max: float = Field(0.04, ge=0, description="dynamic: coefficient at the last step")
    warmup_ratio: float = Field(0.3, gt=0, lt=1, description="dynamic: w/t, share of steps in the falling phase")

    @model_validator(mode="after")
    def _range(self) -> "KLConfig":
        if self.controller == "dynamic" and self.beta_min > self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must not exceed beta_max ({self.beta_max})")
        return self

    @property
    def enabled(self) -> bool:
        """Whether a reference model is needed at all."""
        if self.controller == "dynamic":
            return self.beta_max > 0
        return self.coef > 0


class EntropyConfig(_Strict):
    coef: float = Field(0.0, ge=0, description="entropy bonus: loss -= coef * aggregated token entropy")


class MismatchConfig(_Strict):
    """Gap between the sampler's logprobs and the trainer's (vLLM bf16 vs trainer fp32).

    Metrics are logged whenever rollout logprobs are given; the correction is opt-in."""

    is_level: Literal["token", "sequence"] | None = Field(None, description="truncated IS weights; null = metrics only")
    is_threshold: float = Field(2.0, gt=0, description="C in min(exp(old - rollout), C)")
    is_batch_normalize: bool = Field(False, description="rescale IS weights to mean 1 over the batch")
    rejection: str | None = Field(None, description="verl rollout_rs modes, e.g. 'seq_mean_k3' (drop sequences)")
    rejection_threshold: float | str | None = None

    @model_validator(mode="after")
    def _rs(self) -> "MismatchConfig":
        if self.rejection is not None and self.rejection_threshold is None:
            raise ValueError("mismatch.rejection needs rejection_threshold")
        return self


class DynamicSamplingConfig(_Strict):
    """DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts
    until the batch holds the wanted number of groups."""

    enabled: bool = False
    max_rounds: int = Field(3, ge=1, description="generation rounds per step before training on what there is")
    tolerance: float = Field(0.0, ge=0, description="rewards within this spread count as equal")


class PerceptionAnchorConfig(_Strict):
    """KL to the reference on perception prompts only (docs/rl-stage.md, Hybrid terms)."""

    kl_coef: float = Field(0.0, ge=0, description="coefficient of the KL on perception rows; 0 = off")
    kind: KLKind = Field("k3", description="KL estimator (as kl.kind)")


class VisualConfig(_Strict):
    """The implicit perception term: how much the response's log-probability depends on
    the image (real image vs a masked one), as a capped reward bonus and a metric."""

    coef: float = Field(0.0, ge=0, description="bonus = coef * clip(dependency, 0, cap); 0 = no bonus")
    cap: float = Field(0.5, gt=0, description="dependency above this earns nothing more (anti-gaming cap)")
    per: Literal["token", "sequence"] = Field("token", description="dependency as the mean per response token or the sum per sequence")
    correct_only: bool = Field(True, description="only correct responses earn the bonus (wrong image-dependent text earns nothing)")
    min_entropy: float | None = Field(
        None, ge=0, description="entropy guard: a response whose mean token entropy is below this earns no bonus; null = off"
    )
    metric: bool = Field(False, description="measure visual/dependency every step even with coef 0 (two extra no-grad forwards)")

    @property
    def enabled(self) -> bool:
        return self.coef > 0 or self.metric


class GuidanceConfig(_Strict):
    """Off-policy guidance (LUFFY, Yan et al. 2025): a group in which no sample is right
    gets the record's reference solution as one more member, so the group carries a
    signal (the reference up, the wrong samples down) where GRPO alone has none."""

    enabled: bool = False
    when: Literal["all_wrong", "always"] = Field("all_wrong", description="which groups get the reference: those with no right sample, or every group")
    shaping: float | None = Field(
        None, gt=0,
        description="LUFFY's policy shaping gamma: the reference's tokens enter the loss as -A pi/(pi + gamma) (unclipped) instead of "
        "PPO-clip at ratio 1; null = ratio 1, an advantage-weighted SFT term (LUFFY uses 0.1)",
    )


class RLAlgoConfig(_Strict):
    """Everything about the RL update that is not the model, the data or the rewards."""

    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()
    kl: KLConfig = KLConfig()
    entropy: EntropyConfig = EntropyConfig()
    mismatch: MismatchConfig = MismatchConfig()
    perception_anchor: PerceptionAnchorConfig = PerceptionAnchorConfig()
    visual: VisualConfig = VisualConfig()
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    mask_truncated: bool = Field(False, description="zero the loss of responses cut at the length limit (DAPO overlong filtering)")
    epochs: int = Field(1, ge=1, description="passes over each step's batch")
    mini_batch_size: int | None = Field(None, ge=1, description="samples per optimizer step; null = the whole batch")
    shuffle: bool = Field(True, description="reshuffle samples before each epoch")
    seed: int = 0

    @model_validator(mode="after")
    def _guidance_without_correction(self) -> "RLAlgoConfig":
        if self.guidance.enabled and (self.mismatch.is_level is not None or self.mismatch.rejection is not None or self.loss.name == "bypass_mode"):
            raise ValueError(
                "algo.guidance cannot be combined with algo.mismatch.is_level / rejection or loss bypass_mode: a reference "
                "solution has no sampling logprobs to correct against; turn one of them off"
            )
        return self

    @classmethod
    def dr_grpo(cls, max_response_tokens: int, **overrides) -> "RLAlgoConfig":
        """Dr.GRPO (Liu et al. 2025): no std division, no per-response length normalisation."""
        return cls.model_validate(
            _merge(
                {
                    "advantage": {"estimator": "grpo", "norm_by_std": False},
                    "loss": {"agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": max_response_tokens},
                },
                overrides,
            )
        )

    @classmethod
    def dapo(cls, **overrides) -> "RLAlgoConfig":
        """DAPO (Yu et al. 2025): clip-higher, token-mean, dynamic sampling, overlong filtering, no KL."""
        return cls.model_validate(
            _merge(
                {
                    "loss": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "agg_mode": "token-mean"},
                    "kl": {"coef": 0.0},
                    "dynamic_sampling": {"enabled": True},
                    "mask_truncated": True,
                },
                overrides,
            )
        )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

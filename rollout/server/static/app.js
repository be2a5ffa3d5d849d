// The inspector page: plain ES module, no build step, no third-party code.
// Every value from the run goes into the page as text (textContent), never as HTML.

const $ = (sel) => document.querySelector(sel);
const POLL_MS = 3000;
const PAGE = 50;

const state = { run: null, stage: null, info: null, offset: 0, total: 0, query: {}, group: null, extraPlots: [], lastCount: -1 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    const s = v.toFixed(digits);
    return /^-0\.0*$/.test(s) ? s.slice(1) : s; // a mean of -1e-17 (a float sum of advantages) is 0, not "-0.000"
  }
  return String(v);
}

function showError(msg) {
  const box = $("#error");
  box.textContent = msg || "";
  box.hidden = !msg;
}

async function api(path, opts = {}) {
  const res = await fetch(path, opts);
  const body = res.headers.get("content-type")?.includes("json") ? await res.json() : await res.text();
  if (!res.ok) throw new Error(`${res.status}: ${body?.detail ?? body}`);
  return body;
}

const stagePath = (rest) => `api/stages/${encodeURIComponent(state.stage)}/${rest}`;
const fileUrl = (rel) => "api/files/" + rel.split("/").map(encodeURIComponent).join("/");

// ------------------------------------------------------------------ run and stage

async function loadRun() {
  state.run = await api("api/run");
  $("#run-name").textContent = `— ${state.run.name}`;
  const select = $("#stage");
  const withRollouts = state.run.stages.filter((s) => s.rollouts);
  const current = select.value;
  select.replaceChildren(...state.run.stages.map((s) => el("option", { value: s.name }, s.name + (s.rollouts ? "" : " (no rollouts)"))));
  select.value = current || (withRollouts[0] || state.run.stages[0] || {}).name || "";
  const ckpt = $("#live-ckpt");
  const ckptCurrent = ckpt.value;
  ckpt.replaceChildren(...state.run.stages.filter((s) => s.checkpoint).map((s) => el("option", { value: s.name }, s.name)));
  if (ckptCurrent) ckpt.value = ckptCurrent;
  const none = ckpt.options.length === 0;
  $("#live-go").disabled = none;
  if (none) $("#live-status").textContent = "no stage of this run has a checkpoint yet";
  else if ($("#live-status").textContent.startsWith("no stage")) $("#live-status").textContent = "";
  $("#live-n").max = state.run.limits.max_samples;
  $("#live-max").max = state.run.limits.max_new_tokens;
}

async function selectStage() {
  state.stage = $("#stage").value;
  state.offset = 0;
  state.lastCount = -1;
  $("#group").hidden = true;
  await refresh(true);
}

async function refresh(force = false) {
  if (!state.stage) {
    $("#page-info").textContent = "this run has no stage output yet";
    return;
  }
  const stage = state.run.stages.find((s) => s.name === state.stage);
  let changedStore = false;
  if (stage && stage.rollouts) {
    const info = await api(stagePath("store"));
    const changed = force || info.count !== state.lastCount;
    state.info = info;
    state.lastCount = info.count;
    changedStore = changed;
    if (changed) {
      fillFilterChoices();
      await Promise.all([loadSteps(), loadRows()]);
    }
  } else {
    // nothing of the last stage's store may stay: its columns, its step count, its rollout plots
    state.info = null;
    $("#steps-count").textContent = "";
    for (const part of ["#steps thead", "#steps tbody", "#rows thead", "#rows tbody"]) $(part).replaceChildren();
    $("#page-info").textContent = "this stage has no rollout store";
  }
  // the size from api/run (polled anyway), not the metrics themselves: megabytes on a long run
  const metricsSize = stage ? stage.metrics_bytes : 0;
  if (force || metricsSize !== state.lastMetrics || changedStore) await loadPlots();
  state.lastMetrics = metricsSize;
  $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// ------------------------------------------------------------------ steps

async function loadSteps() {
  const steps = await api(stagePath("steps"));
  const comps = state.info.components;
  $("#steps-count").textContent = `(${steps.length})`;
  $("#steps thead").replaceChildren(
    el("tr", {}, ["step", "rollouts", "groups", "reward", "min", "max", "advantage", "length", "truncated", "errors", ...comps].map((h) => el("th", {}, h))),
  );
  $("#steps tbody").replaceChildren(
    ...steps.slice().reverse().map((s) =>
      el(
        "tr",
        { class: "clickable", title: "show this step's rollouts", onclick: () => { $("#f-step").value = s.step; applyFilters(); } },
        [s.step, s.n, s.n_groups, s.reward_mean, s.reward_min, s.reward_max, s.advantage_mean, s.length_mean, s.truncated, s.errors, ...comps.map((c) => s.components[c])].map((v) =>
          el("td", {}, fmt(v)),
        ),
      ),
    ),
  );
}

// ------------------------------------------------------------------ filters and listing

function fillFilterChoices() {
  const keep = (sel, options) => {
    const node = $(sel);
    const v = node.value;
    node.replaceChildren(...options);
    if ([...node.options].some((o) => o.value === v)) node.value = v;
  };
  keep("#f-task", [el("option", { value: "" }, "any"), ...state.info.tasks.map((t) => el("option", { value: t }, t))]);
  keep("#f-comp", [el("option", { value: "" }, "—"), ...state.info.components.map((c) => el("option", { value: c }, c))]);
  const sorts = ["id", "step", "total_reward", "advantage", "length", "difficulty", "policy_version", "task"];
  const sortSel = $("#f-sort");
  const v = sortSel.value || "total_reward";
  sortSel.replaceChildren(
    ...sorts.map((s) => el("option", { value: s, selected: s === "total_reward" }, s)), // what Reset returns to
    ...state.info.components.map((c) => el("option", { value: "components." + c }, "component: " + c)),
  );
  sortSel.value = [...sortSel.options].some((o) => o.value === v) ? v : "total_reward";
}

function readFilters() {
  const q = {};
  const val = (id) => $(id).value.trim();
  const put = (key, id) => { if (val(id) !== "") q[key] = val(id); };
  put("step", "#f-step");
  put("step_min", "#f-step-min");
  put("step_max", "#f-step-max");
  put("task", "#f-task");
  put("difficulty", "#f-difficulty");
  put("status", "#f-status");
  put("policy_version", "#f-version");
  put("reward_min", "#f-reward-min");
  put("reward_max", "#f-reward-max");
  put("advantage_min", "#f-adv-min");
  put("advantage_max", "#f-adv-max");
  put("length_min", "#f-len-min");
  put("length_max", "#f-len-max");
  if (val("#f-comp")) q.comp = `${val("#f-comp")}:${val("#f-comp-min")}:${val("#f-comp-max")}`;
  q.sort = val("#f-sort") || "total_reward";
  q.desc = $("#f-desc").checked;
  return q;
}

async function applyFilters() {
  state.query = readFilters();
  state.offset = 0;
  await loadRows();
}

async function loadRows() {
  const params = new URLSearchParams({ ...state.query, limit: PAGE, offset: state.offset });
  let page;
  try {
    page = await api(stagePath("rollouts?" + params));
    showError("");
  } catch (e) {
    showError(e.message);
    return;
  }
  state.total = page.total ?? 0;
  const comps = state.info.components;
  $("#page-info").textContent = page.rows.length ? `${state.offset + 1}–${state.offset + page.rows.length} of ${state.total}` : `no rollouts match (${state.total})`;
  $("#rows thead").replaceChildren(
    el("tr", {}, ["id", "step", "task", "diff", "group", "#", "reward", "advantage", "length", "version", "status", ...comps, "response"].map((h) => el("th", {}, h))),
  );
  $("#rows tbody").replaceChildren(
    ...page.rows.map((r) =>
      el(
        "tr",
        { "data-id": r.id },
        el("td", {}, r.id),
        el("td", {}, r.step),
        el("td", { class: "text" }, r.task),
        el("td", {}, r.difficulty),
        el("td", { class: "text" }, el("a", { class: "group-link", onclick: () => openGroup(r.group_id, r.step) }, r.group_id)),
        el("td", { title: r.meta && r.meta.guided ? "the record's reference solution, added by guidance" : "" }, `${r.sample_index}${guidedMark(r)}`),
        el("td", {}, fmt(r.total_reward)),
        el("td", {}, fmt(r.advantage)),
        el("td", {}, r.response_tokens),
        el("td", {}, r.policy_version),
        el("td", {}, r.status),
        ...comps.map((c) => el("td", { class: r.components[c] == null ? "none" : "" }, fmt(r.components[c]))),
        el("td", { class: "text", title: r.response }, r.response.slice(0, 120)),
      ),
    ),
  );
}

// ------------------------------------------------------------------ group view

// A stored row that the policy did not write (algo.guidance's reference solution) says so.
function guidedMark(r) {
  return r.meta && r.meta.guided ? " reference" : "";
}

async function openGroup(groupId, step) {
  let g;
  try {
    g = await api(stagePath(`groups/${encodeURIComponent(groupId)}?step=${step}`));
  } catch (e) {
    showError(e.message);
    return;
  }
  state.group = g;
  $("#group-title").textContent = `${g.group_id} · step ${g.step} · ${g.task} · difficulty ${g.difficulty}`;
  $("#group-images").replaceChildren(...g.images.map((p) => el("img", { class: "prompt-image", src: fileUrl(p), alt: p, title: p })));
  $("#group-prompt-text").textContent = g.prompt
    .map((m) => `${m.role}: ` + (typeof m.content === "string" ? m.content : m.content.map((c) => (c.type === "image" ? "[image]" : c.text ?? "")).join(" ")))
    .join("\n");
  $("#group-answer").textContent = g.answer ?? "—";
  $("#group-stats").textContent = `reward mean ${fmt(g.reward_mean)} · std ${fmt(g.reward_std)} · ${g.samples.length} responses` + (g.reward_std === 0 ? " · all equal: no learning signal" : "");
  compareTable($("#group-components"), g.components, g.samples.map((s) => ({ label: `#${s.sample_index}${guidedMark(s)}`, components: s.components, total: s.total_reward, advantage: s.advantage, length: s.response_tokens })));
  $("#group-samples").replaceChildren(
    ...g.samples.map((s) => card(`#${s.sample_index}${guidedMark(s)}`, s.response, s.components, [["total", s.total_reward], ["advantage", s.advantage], ["tokens", s.response_tokens], ["finish", s.finish_reason]])),
  );
  $("#group").hidden = false;
  $("#group").scrollIntoView({ block: "start" });
}

// Rows = components (then total, advantage, length), columns = samples; the best value of each row is marked.
function compareTable(table, components, samples) {
  table.querySelector("thead").replaceChildren(el("tr", {}, el("th", {}, "component"), ...samples.map((s) => el("th", {}, s.label))));
  const rows = [...components.map((c) => [c, samples.map((s) => s.components[c])]), ["total", samples.map((s) => s.total)]];
  if (samples.some((s) => s.advantage !== undefined)) rows.push(["advantage", samples.map((s) => s.advantage)]);
  rows.push(["length", samples.map((s) => s.length)]);
  table.querySelector("tbody").replaceChildren(
    ...rows.map(([name, vals]) => {
      const nums = vals.filter((v) => typeof v === "number");
      const best = name === "length" || nums.length < 2 || Math.min(...nums) === Math.max(...nums) ? null : Math.max(...nums);
      return el("tr", { "data-component": name }, el("th", {}, name), ...vals.map((v) => el("td", { class: v == null ? "none" : v === best ? "best" : "" }, fmt(v))));
    }),
  );
}

// `contributions` (live samples): each component's weighted share of the total, the
// reason a total differs from the sum of the bars.
function card(title, text, components, facts, contributions = null) {
  const values = Object.values(components).filter((v) => typeof v === "number");
  const scale = Math.max(1, ...values.map(Math.abs));
  const signed = (v) => (v < 0 ? "-" : "+") + Math.abs(v).toFixed(3);
  return el(
    "div",
    { class: "card sample-card" },
    el("h4", {}, el("span", {}, title), el("span", {}, facts.map(([k, v]) => `${k} ${fmt(v)}`).join(" · "))),
    el("div", { class: "response" }, text),
    contributions ? el("div", { class: "contributions muted" }, "weighted: " + (Object.entries(contributions).map(([k, v]) => `${k} ${signed(v)}`).join(" · ") || "none")) : [],
    ...Object.entries(components).map(([name, v]) =>
      el(
        "div",
        { class: "bar", "data-component": name },
        el("span", {}, name),
        el("span", { class: "track" }, v == null ? "" : el("span", { class: "fill" + (v < 0 ? " neg" : ""), style: `left:${v < 0 ? 50 - (50 * -v) / scale : 50}%;width:${(50 * Math.abs(v)) / scale}%` })),
        el("span", {}, v == null ? "n/a" : fmt(v)),
      ),
    ),
  );
}

// ------------------------------------------------------------------ curves

function plotSets() {
  const comps = state.info ? state.info.components : [];
  const sets = [];
  if (state.info) {
    sets.push({ title: "reward per step (rollouts)", keys: ["rollouts/reward_mean", "rollouts/reward_min", "rollouts/reward_max"] });
    sets.push({ title: "accuracy per step (share correct)", keys: ["rollouts/accuracy"] });
    sets.push({ title: "component means (accuracy, format, ...)", keys: comps.map((c) => "rollouts/component/" + c) });
    sets.push({ title: "response length (tokens)", keys: ["rollouts/length_mean"] });
  }
  const metricKeys = [...$("#metric-keys").options].map((o) => o.value);
  // the RL stage's greedy held-out curve (eval_every), apart from the rollouts' accuracy
  const held = metricKeys.filter((k) => k.startsWith("heldout/"));
  if (held.length) sets.push({ title: "held-out accuracy (greedy)", keys: held.slice(0, 8) });
  const acc = metricKeys.filter((k) => /acc/.test(k) && !held.includes(k));
  if (acc.length) sets.push({ title: "accuracy (metrics.jsonl)", keys: acc.slice(0, 8) });
  const rew = metricKeys.filter((k) => /reward.*mean/.test(k) && !acc.includes(k));
  if (rew.length) sets.push({ title: "reward (metrics.jsonl)", keys: rew.slice(0, 8) });
  const len = metricKeys.filter((k) => /length/.test(k));
  if (len.length) sets.push({ title: "length (metrics.jsonl)", keys: len.slice(0, 8) });
  const loss = metricKeys.filter((k) => /loss/.test(k));
  if (loss.length) sets.push({ title: "loss", keys: loss.slice(0, 4) });
  return [...sets, ...state.extraPlots];
}

async function loadPlots() {
  const m = await api(stagePath("metrics"));
  const sel = $("#metric-keys");
  const chosen = new Set([...sel.selectedOptions].map((o) => o.value));
  sel.replaceChildren(...m.keys.map((k) => el("option", { value: k, selected: chosen.has(k) }, k)));
  const bust = Date.now();
  const plots = plotSets()
    .filter((s) => s.keys.length)
    .map((s) => {
      const p = new URLSearchParams({ title: s.title, _: bust });
      s.keys.forEach((k) => p.append("key", k));
      return el("img", { src: stagePath("plot.svg?" + p), alt: s.title, title: s.title });
    });
  $("#plots").replaceChildren(...(plots.length ? plots : [el("p", { class: "muted" }, "nothing to plot: this stage has no rollout store and no numbers in metrics.jsonl")]));
}

// ------------------------------------------------------------------ eval

async function loadEval() {
  const parts = [];
  for (const s of state.run.stages.filter((s) => s.eval)) {
    const e = await api(`api/stages/${encodeURIComponent(s.name)}/eval`);
    const table = (title, obj) =>
      el("table", { class: "data" }, el("thead", {}, el("tr", {}, el("th", {}, title), el("th", {}, "accuracy"))), el("tbody", {}, Object.entries(obj || {}).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, fmt(v))))));
    parts.push(
      el("div", { class: "eval-stage" }, el("h3", {}, `${s.name}: accuracy ${fmt(e.accuracy)} (n=${e.n ?? "?"})`), table("family", e.by_family), table("task", e.by_task)),
    );
  }
  $("#eval").replaceChildren(...(parts.length ? parts : [el("p", { class: "muted" }, "no stage has an eval.json yet")]));
}

// ------------------------------------------------------------------ live

async function readImage(file) {
  if (!file) return null;
  const url = await new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => fail(r.error);
    r.readAsDataURL(file);
  });
  return url;
}

async function liveGenerate(ev) {
  ev.preventDefault();
  const status = $("#live-status");
  const seed = $("#live-seed").value;
  const body = {
    checkpoint: $("#live-ckpt").value,
    prompt: $("#live-prompt").value,
    image_b64: await readImage($("#live-image").files[0]),
    answer: $("#live-answer").value || null,
    task: $("#live-task").value || "chat",
    n: Number($("#live-n").value),
    max_new_tokens: Number($("#live-max").value),
    temperature: Number($("#live-temp").value),
    seed: seed === "" ? null : Number(seed),
  };
  status.textContent = "generating… (the first call loads the checkpoint)";
  $("#live-go").disabled = true;
  try {
    const r = await api("api/live/generate", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    // no policy_version here: the engine's count of updates since loading is always 0, which
    // beside the listing's versions would read as "the untrained weights"
    status.textContent = `${r.samples.length} samples from ${r.checkpoint}; rewards: ${r.reward_source} stack; generate ${fmt(r.seconds_generate, 2)} s, score ${fmt(r.seconds_score, 2)} s`;
    compareTable($("#live-components"), r.components, r.samples.map((s) => ({ label: `#${s.index}`, components: s.components, total: s.total, length: s.tokens })));
    $("#live-samples").replaceChildren(
      ...r.samples.map((s) => card(`#${s.index}`, s.text, s.components, [["total", s.total], ["tokens", s.tokens], ["correct", s.correct], ...Object.entries(s.failures).map(([k, v]) => [k + " failed", v])], s.contributions)),
    );
  } catch (e) {
    status.textContent = e.message;
  } finally {
    $("#live-go").disabled = false;
  }
}

// ------------------------------------------------------------------ wiring

function showTab(name) {
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab-body").forEach((s) => (s.hidden = s.id !== "tab-" + name));
  if (name === "eval") loadEval().catch((e) => showError(e.message));
}

async function poll() {
  if ($("#live-updates").checked && document.visibilityState === "visible") {
    try {
      await loadRun();
      // the first stage of a run that had none: loadRun selected it, open it
      if (!state.stage && $("#stage").value) await selectStage();
      else await refresh(false);
    } catch (e) {
      showError(e.message);
    }
  }
  setTimeout(poll, POLL_MS);
}

async function main() {
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("#stage").addEventListener("change", () => selectStage().catch((e) => showError(e.message)));
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); applyFilters(); });
  // The button's id must not be "reset": a form's named controls shadow its methods (form.reset).
  $("#f-reset").addEventListener("click", () => { $("#filters").reset(); applyFilters(); });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadRows(); });
  $("#next").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; loadRows(); } });
  $("#group-close").addEventListener("click", () => ($("#group").hidden = true));
  $("#custom-plot").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const keys = [...$("#metric-keys").selectedOptions].map((o) => o.value);
    if (keys.length) state.extraPlots.push({ title: keys.join(", "), keys: keys.slice(0, 10) });
    loadPlots();
  });
  $("#live-form").addEventListener("submit", liveGenerate);
  try {
    await loadRun();
    state.query = readFilters();
    await selectStage();
    document.body.dataset.ready = "1";
  } catch (e) {
    showError(e.message);
  }
  setTimeout(poll, POLL_MS);
}

main();

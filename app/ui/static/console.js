// The console: a hash router (#/jobs, #/jobs/ID, #/artifacts, #/artifacts/NAME[/V],
// #/lineage/NAME/V, #/schedules) over read-only calls to the JSON API.
import { apiKey, saveKey, forgetKey, getJson, download, ApiError } from "./api.js";
import { h, table, facts, when, seconds, bytes } from "./dom.js";
import { lineageSvg } from "./lineage.js";
import { gateChart } from "./chart.js";

const POLL_MS = 1000;
const STATES = ["", "queued", "running", "succeeded", "failed", "cancelled"];
const KINDS = ["", "merge", "edit", "extract_lora", "moe", "upload"];
const main = document.getElementById("main");
let generation = 0; // a page's polling stops once another page was shown

function show(...children) {
  main.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function stale(gen) {
  return gen !== generation;
}

function failure(err) {
  if (err instanceof ApiError && err.status === 401) {
    forgetKey();
    renderLogin("The API key was refused (unknown or revoked): enter a valid key.");
    return null;
  }
  return h("p", { class: "error", role: "alert" }, `Error: ${err.message}`);
}

function stateCell(state) {
  return h("span", { class: `state-${state}`, "data-state": state }, state);
}

function progressOf(job) {
  const p = job.progress || {};
  if (job.state === "succeeded") return h("progress", { max: 1, value: 1, title: "done" });
  const total = p.tensors_total || p.bytes_total;
  const done = p.tensors_total ? p.tensors_done : p.bytes_done;
  const text = p.tensors_total ? `${p.tensors_done}/${p.tensors_total} tensors` : p.bytes_total ? `${bytes(p.bytes_done)} / ${bytes(p.bytes_total)}` : "";
  const bar = total ? h("progress", { max: total, value: done, title: text }) : h("progress", { title: "waiting" });
  return h("span", {}, bar, " ", h("span", { class: "muted" }, [p.phase, text].filter(Boolean).join(" · ")));
}

function errorText(error) {
  if (!error) return "";
  const where = [
    error.field && `field ${error.field}`,
    error.model && `model ${error.model}`,
    error.tensor && `tensor ${error.tensor}`,
    error.file && `file ${error.file}`,
  ].filter(Boolean);
  return h("span", { class: "error" }, error.message, where.length ? ` (${where.join(", ")})` : "");
}

function jobLink(id) {
  return h("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: "mono" }, id.slice(0, 8));
}

function artifactLink(ref) {
  if (!ref) return "—";
  return h("a", { href: `#/artifacts/${encodeURIComponent(ref.name)}/${ref.version}` }, `${ref.name} v${ref.version}`);
}

// ---- login --------------------------------------------------------------------------------

function renderLogin(message) {
  generation += 1;
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "off", placeholder: "wsk_…", required: true });
  const note = h("p", { class: "error", id: "login-error", role: "alert" }, message || "");
  const form = h(
    "form",
    { class: "login", id: "login" },
    h("h1", {}, "Sign in with an API key"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    note,
    h("p", { class: "muted" }, "The key stays in this tab's session storage and is sent only in the Authorization header of this service's API calls."),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    try {
      await getJson("/v1/tenant", key);
    } catch (err) {
      note.textContent = err instanceof ApiError && err.status === 401 ? "This API key is not valid." : `Error: ${err.message}`;
      return;
    }
    saveKey(key);
    input.value = "";
    if (!location.hash || location.hash === "#/login") location.hash = "#/jobs";
    else route();
  });
  show(form);
}

// ---- jobs ---------------------------------------------------------------------------------

function hashQuery() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

function select(id, options, value, onChange) {
  const el = h("select", { id }, options.map((o) => h("option", { value: o, selected: o === value }, o || "any")));
  el.addEventListener("change", () => onChange(el.value));
  return el;
}

async function renderJobs(gen) {
  const q = hashQuery();
  const state = q.get("state") || "";
  const kind = q.get("kind") || "";
  const go = (s, k) => {
    const p = new URLSearchParams();
    if (s) p.set("state", s);
    if (k) p.set("kind", k);
    location.hash = `#/jobs${p.toString() ? `?${p}` : ""}`;
  };
  const body = h("div", { id: "jobs-body" }, h("p", {}, "Loading…"));
  show(
    h("h1", {}, "Jobs"),
    h("div", { class: "filters" }, h("label", {}, "State ", select("filter-state", STATES, state, (v) => go(v, kind))), h("label", {}, "Kind ", select("filter-kind", KINDS, kind, (v) => go(state, v)))),
    body,
  );
  const params = new URLSearchParams({ limit: "50" });
  if (state) params.set("state", state);
  if (kind) params.set("kind", kind);
  while (!stale(gen)) {
    let page;
    try {
      page = await getJson(`/v1/jobs?${params}`);
    } catch (err) {
      const shown = failure(err);
      if (shown && !stale(gen)) body.replaceChildren(shown);
      return;
    }
    if (stale(gen)) return;
    const rows = page.items.map((job) =>
      h(
        "tr",
        { "data-job": job.id },
        h("td", {}, jobLink(job.id)),
        h("td", {}, job.kind),
        h("td", {}, stateCell(job.state)),
        h("td", {}, job.artifact_name),
        h("td", {}, progressOf(job)),
        h("td", {}, when(job.created_at)),
        h("td", {}, job.artifact ? artifactLink(job.artifact) : errorText(job.error)),
      ),
    );
    body.replaceChildren(
      rows.length
        ? table(["job", "kind", "state", "artifact name", "progress", "created", "result"], rows, { id: "jobs" })
        : h("p", { id: "no-jobs", class: "muted" }, "No jobs."),
    );
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function pinnedInputs(recipe) {
  // every string that names a model, wherever the recipe holds it: model, base_model, models[i].model, …
  const found = [];
  const walk = (value, path) => {
    if (Array.isArray(value)) value.forEach((v, i) => walk(v, `${path}/${i}`));
    else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) walk(v, `${path}/${k}`);
    else if (typeof value === "string" && /(^|\/)(model|base_model|base|adapter|experts\/\d+\/source)$/.test(path)) found.push([path, value]);
  };
  walk(recipe, "");
  return found;
}

function metricsTable(metrics) {
  if (!metrics) return null;
  const rows = [];
  for (const [name, value] of Object.entries(metrics)) {
    if (name === "gate") continue;
    if (typeof value === "number" || value === null) rows.push(h("tr", {}, h("td", {}, name), h("td", { class: "num" }, value === null ? "—" : value.toPrecision(4))));
    else if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) if (typeof v === "number") rows.push(h("tr", {}, h("td", {}, `${name}.${k}`), h("td", { class: "num" }, v.toPrecision(4))));
    }
  }
  const gate = metrics.gate;
  return h(
    "section",
    { id: "metrics" },
    h("h2", {}, "Edit metrics"),
    gate ? h("p", { id: "gate", "data-passed": String(gate.passed) }, "Gate: ", h("strong", { class: gate.passed ? "state-succeeded" : "state-failed" }, gate.passed ? "passed" : "failed"), gate.failures && gate.failures.length ? ` — ${gate.failures.join("; ")}` : "") : null,
    gate && Array.isArray(gate.checks) && gate.checks.length ? h("div", { class: "chart" }, gateChart(gate.checks)) : null,
    table(["metric", "value"], rows),
  );
}

async function renderJob(gen, id) {
  while (!stale(gen)) {
    let job;
    let deliveries = { items: [] };
    try {
      job = await getJson(`/v1/jobs/${encodeURIComponent(id)}`);
      deliveries = await getJson(`/v1/jobs/${encodeURIComponent(id)}/deliveries`).catch(() => ({ items: [] }));
    } catch (err) {
      const shown = failure(err);
      if (shown && !stale(gen)) show(h("h1", {}, `Job ${id}`), shown);
      return;
    }
    let manifest = null;
    if (job.artifact && job.kind === "edit") {
      manifest = await getJson(`/v1/artifacts/${encodeURIComponent(job.artifact.name)}/versions/${job.artifact.version}`).catch(() => null);
    }
    if (stale(gen)) return;
    const metrics = (manifest && manifest.metrics) || (job.error && job.error.metrics);
    show(
      h("h1", {}, `Job `, h("span", { class: "mono" }, job.id)),
      facts([
        ["kind", job.kind],
        ["state", stateCell(job.state)],
        ["progress", progressOf(job)],
        ["artifact", job.artifact ? artifactLink(job.artifact) : job.artifact_name],
        ["error", job.error ? errorText(job.error) : null],
        ["created", when(job.created_at)],
        ["started", when(job.started_at)],
        ["finished", when(job.finished_at)],
        ["queued for", seconds(job.created_at, job.started_at)],
        ["ran for", seconds(job.started_at, job.finished_at)],
        ["attempts", `${job.attempts} of ${job.max_attempts}`],
        ["schedule", job.schedule_id],
      ]),
      h("h2", {}, "Pinned inputs"),
      table(["where", "reference"], pinnedInputs(job.recipe).map(([p, v]) => h("tr", {}, h("td", { class: "mono" }, `/recipe${p}`), h("td", { class: "mono" }, v))), { id: "inputs" }),
      metricsTable(metrics),
      h("h2", {}, "Webhook deliveries"),
      deliveries.items.length
        ? table(["event", "url", "state", "attempts", "delivered"], deliveries.items.map((d) => h("tr", {}, h("td", {}, d.event_type), h("td", { class: "mono" }, d.url), h("td", {}, d.state), h("td", { class: "num" }, d.attempts.length), h("td", {}, when(d.delivered_at)))))
        : h("p", { class: "muted" }, "None."),
      h("h2", {}, "Recipe"),
      h("pre", { id: "recipe" }, JSON.stringify(job.recipe, null, 2)),
    );
    if (["succeeded", "failed", "cancelled"].includes(job.state)) return;
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

// ---- artifacts ----------------------------------------------------------------------------

async function renderArtifacts(gen) {
  let list;
  try {
    list = await getJson("/v1/artifacts");
  } catch (err) {
    show(h("h1", {}, "Artifacts"), failure(err));
    return;
  }
  if (stale(gen)) return;
  show(
    h("h1", {}, "Artifacts"),
    list.items.length
      ? table(["name", "latest version", "published", "reference"], list.items.map((a) => h("tr", { "data-artifact": a.name }, h("td", {}, h("a", { href: `#/artifacts/${encodeURIComponent(a.name)}` }, a.name)), h("td", {}, h("a", { href: `#/artifacts/${encodeURIComponent(a.name)}/${a.version}` }, `v${a.version}`)), h("td", {}, when(a.published_at)), h("td", { class: "mono" }, a.reference))), { id: "artifacts" })
      : h("p", { id: "no-artifacts", class: "muted" }, "No artifacts."),
  );
}

async function renderVersions(gen, name) {
  let list;
  try {
    list = await getJson(`/v1/artifacts/${encodeURIComponent(name)}/versions`);
  } catch (err) {
    show(h("h1", {}, name), failure(err));
    return;
  }
  if (stale(gen)) return;
  show(
    h("h1", {}, `Artifact ${name}`),
    table(["version", "published", "reference", "lineage"], list.items.map((v) => h("tr", {}, h("td", {}, h("a", { href: `#/artifacts/${encodeURIComponent(name)}/${v.version}` }, `v${v.version}`)), h("td", {}, when(v.published_at)), h("td", { class: "mono" }, v.reference), h("td", {}, h("a", { href: `#/lineage/${encodeURIComponent(name)}/${v.version}` }, "graph")))), { id: "versions" }),
  );
}

async function renderVersion(gen, name, version) {
  const base = `/v1/artifacts/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`;
  let m;
  try {
    m = await getJson(base);
  } catch (err) {
    show(h("h1", {}, `${name} v${version}`), failure(err));
    return;
  }
  if (stale(gen)) return;
  const record = m.artifact || {};
  const fileRows = (m.files || []).map((f) => {
    const button = h("button", { type: "button", class: "download", "data-path": f.path }, "download");
    button.addEventListener("click", () => download(`${base}/files/${f.path.split("/").map(encodeURIComponent).join("/")}`, f.path.split("/").pop()).catch((err) => alert(err.message)));
    return h("tr", {}, h("td", { class: "mono" }, f.path), h("td", { class: "num" }, bytes(f.size)), h("td", { class: "mono" }, f.sha256), h("td", {}, button));
  });
  show(
    h("h1", {}, `Artifact ${name} v${record.version || version}`),
    facts([
      ["reference", h("span", { class: "mono" }, record.reference)],
      ["made by", [m.kind, m.method || (m.recipe && m.recipe.edit_method)].filter(Boolean).join(" · ")],
      ["job", record.job_id ? jobLink(record.job_id) : null],
      ["published", when(record.published_at)],
      ["flagged", m.flagged ? "yes: published despite a failed gate" : null],
      ["lineage", h("a", { href: `#/lineage/${encodeURIComponent(name)}/${record.version || version}`, id: "lineage-link" }, "graph of its parents")],
    ]),
    h("h2", {}, "Parents"),
    table(["role", "reference", "pinned"], (m.parents || []).map((p) => h("tr", {}, h("td", {}, p.role), h("td", { class: "mono" }, p.reference), h("td", { class: "mono" }, p.pinned)))),
    metricsTable(m.metrics),
    h("h2", {}, "Files"),
    table(["path", "size", "sha256", ""], fileRows, { id: "files" }),
  );
}

async function renderLineage(gen, name, version) {
  let graph;
  try {
    graph = await getJson(`/v1/artifacts/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}/lineage`);
  } catch (err) {
    show(h("h1", {}, `Lineage of ${name} v${version}`), failure(err));
    return;
  }
  if (stale(gen)) return;
  show(
    h("h1", {}, `Lineage of ${name} v${version}`),
    h("p", { class: "muted" }, "Top: this version; below: what it was made from, down to hub commits and local or s3 inputs. Artifact nodes open their page."),
    graph.truncated ? h("p", { class: "error" }, "The graph is cut at the node limit.") : null,
    h("div", { id: "lineage" }, lineageSvg(graph)),
  );
}

// ---- schedules ----------------------------------------------------------------------------

async function renderSchedules(gen) {
  let list;
  try {
    list = await getJson("/v1/schedules");
  } catch (err) {
    show(h("h1", {}, "Schedules"), failure(err));
    return;
  }
  if (stale(gen)) return;
  show(
    h("h1", {}, "Schedules"),
    list.items.length
      ? table(["schedule", "kind", "cron (UTC)", "enabled", "artifact name", "next run", "last run", "last outcome", "last job"], list.items.map((s) => h("tr", { "data-schedule": s.id }, h("td", { class: "mono" }, s.id.slice(0, 8)), h("td", {}, s.kind), h("td", { class: "mono" }, s.cron), h("td", {}, s.enabled ? "yes" : "no"), h("td", {}, s.artifact_name), h("td", {}, when(s.next_run_at)), h("td", {}, when(s.last_run_at)), h("td", {}, s.last_outcome || "—"), h("td", {}, s.last_run && s.last_run.job_id ? jobLink(s.last_run.job_id) : "—"))), { id: "schedules" })
      : h("p", { id: "no-schedules", class: "muted" }, "No schedules."),
  );
}

// ---- router -------------------------------------------------------------------------------

async function showTenant() {
  try {
    const tenant = await getJson("/v1/tenant");
    document.getElementById("who").textContent = `tenant ${tenant.name}`;
  } catch {
    /* the page itself reports the error */
  }
}

function route() {
  if (!apiKey()) {
    renderLogin();
    return;
  }
  generation += 1;
  const gen = generation;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  showTenant();
  const path = (location.hash.replace(/^#/, "").split("?")[0] || "/jobs").split("/").filter(Boolean).map(decodeURIComponent);
  const [page, a, b] = path;
  if (page === "jobs" && a) renderJob(gen, a);
  else if (page === "artifacts" && a && b) renderVersion(gen, a, b);
  else if (page === "artifacts" && a) renderVersions(gen, a);
  else if (page === "artifacts") renderArtifacts(gen);
  else if (page === "lineage" && a && b) renderLineage(gen, a, b);
  else if (page === "schedules") renderSchedules(gen);
  else renderJobs(gen);
}

document.getElementById("logout").addEventListener("click", () => {
  forgetKey();
  location.hash = "#/login";
  renderLogin();
});
window.addEventListener("hashchange", route);
route();

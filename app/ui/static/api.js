// The console's only way to the service: the JSON API of this origin, with the API key in
// the Authorization header. The key lives in this tab's sessionStorage only (never in a
// URL, a cookie or a log line); closing the tab or "Log out" forgets it.
const KEY_ITEM = "weightsmith.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, problem) {
    const where = (problem.errors || [])
      .map((e) => (e.pointer ? `${e.pointer}: ${e.detail}` : e.detail))
      .join("; ");
    super([problem.detail || problem.title || `HTTP ${status}`, where].filter(Boolean).join(" — "));
    this.status = status;
    this.problem = problem;
  }
}

async function call(path, key) {
  const response = await fetch(path, {
    headers: { Authorization: `Bearer ${key}`, Accept: "application/json" },
    credentials: "omit",
    cache: "no-store",
  });
  return response;
}

export async function getJson(path, key = apiKey()) {
  const response = await call(path, key);
  if (!response.ok) {
    let problem = {};
    try {
      problem = await response.json();
    } catch {
      problem = { title: response.statusText };
    }
    throw new ApiError(response.status, problem);
  }
  return response.json();
}

// A file of an artifact version: fetched with the key, handed to the browser as a download.
export async function download(path, filename) {
  const response = await call(path, apiKey());
  if (!response.ok) throw new ApiError(response.status, { title: response.statusText });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// The edit gate as a bar chart (SVG): one row per check the gate made (perplexity ratio,
// ‖ΔW‖/‖W‖ of each edited layer, ROME's |uᵀk|/‖k‖ per request). The checks measure different
// things, so each row has its own linear scale from 0 to SCALE_HEADROOM × max(value, bound):
// the bar is the value, the vertical line the bound, the bar green when the check passed and
// red when it failed. Colours come from console.css; the numbers are text (textContent).
import { svg } from "./dom.js";

export const SCALE_HEADROOM = 1.25;
const LABEL_W = 200;
const TRACK_W = 340;
const TEXT_W = 190;
const ROW_H = 28;
const BAR_H = 16;
const PAD = 8;

const NAMES = {
  perplexity_ratio: "perplexity ratio",
  relative_update_norm: "‖ΔW‖/‖W‖ layer",
  relative_denominator: "|uᵀk|/‖k‖ request",
};

function label(metric) {
  const [name, index] = metric.split(".", 2);
  return index === undefined ? NAMES[name] || name : `${NAMES[name] || name} ${index}`;
}

function number(x) {
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? String(Number(x.toPrecision(4))) : x.toExponential(2);
}

// A check's value as the API sends it: a finite number, or null / a string for NaN and ±inf.
function finite(x) {
  return typeof x === "number" && Number.isFinite(x) ? x : null;
}

export function gateChart(checks) {
  const width = LABEL_W + TRACK_W + TEXT_W + PAD * 2;
  const height = PAD * 2 + checks.length * ROW_H;
  const root = svg("svg", { class: "gate-chart", id: "gate-chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "the edit gate: each check's value against its bound" });
  checks.forEach((c, i) => {
    const value = finite(c.value);
    const bound = finite(c.bound);
    const scale = SCALE_HEADROOM * Math.max(Math.abs(value ?? 0), Math.abs(bound ?? 0));
    const length = (x) => (scale > 0 && x !== null ? (Math.abs(x) / scale) * TRACK_W : 0);
    const y = PAD + i * ROW_H;
    const g = svg("g", { class: `check ${c.passed ? "pass" : "fail"}`, "data-metric": c.metric, "data-scale": scale, transform: `translate(${PAD},${y})` });
    g.append(svg("title", {}, `${c.metric}: ${value ?? "not a number"} (${c.kind === "min" ? "at least" : "at most"} ${bound ?? "—"})`));
    g.append(svg("text", { class: "name", x: 0, y: ROW_H / 2 + 4 }, label(c.metric)));
    const top = (ROW_H - BAR_H) / 2;
    g.append(svg("rect", { class: "track", x: LABEL_W, y: top, width: TRACK_W, height: BAR_H }));
    g.append(svg("rect", { class: `bar ${c.passed ? "pass" : "fail"}`, x: LABEL_W, y: top, width: length(value), height: BAR_H }));
    if (bound !== null) {
      const x = LABEL_W + length(bound);
      g.append(svg("line", { class: "threshold", x1: x, x2: x, y1: 1, y2: ROW_H - 1 }));
    }
    const relation = c.kind === "min" ? "≥" : "≤";
    const shown = value === null ? "—" : number(value);
    g.append(svg("text", { class: "value", x: LABEL_W + TRACK_W + 8, y: ROW_H / 2 + 4 }, `${shown} (${relation} ${bound === null ? "—" : number(bound)}) ${c.passed ? "✓" : "✗"}`));
    root.append(g);
  });
  return root;
}

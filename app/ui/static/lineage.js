// The lineage graph as SVG: a layered layout with the version on top and its parents below,
// each node on the layer of its longest path from the root (so an edge always points down).
import { svg } from "./dom.js";

const W = 220;
const H = 46;
const GAP_X = 28;
const GAP_Y = 64;
const PAD = 16;

export function layers(graph) {
  // longest distance from the root along child → parent edges (the graph is acyclic; the
  // bound on rounds guards against a malformed answer all the same)
  const depth = new Map([[graph.root, 0]]);
  for (let round = 0; round < graph.nodes.length; round += 1) {
    let changed = false;
    for (const e of graph.edges) {
      const d = (depth.get(e.child) ?? -Infinity) + 1;
      if (d > (depth.get(e.parent) ?? -Infinity)) {
        depth.set(e.parent, d);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const rows = [];
  for (const node of graph.nodes) {
    const d = depth.get(node.id) ?? 0;
    (rows[d] ||= []).push(node);
  }
  return rows.map((r) => r || []);
}

function label(node) {
  if (node.kind === "artifact") return [`${node.name} v${node.version ?? "?"}`, [node.made_by, node.method].filter(Boolean).join(" · ") + (node.flagged ? " · flagged" : "") + (node.missing ? " · missing" : "")];
  if (node.kind === "hub") return [node.name, `hub @ ${(node.revision || "").slice(0, 12)}`];
  if (node.kind === "s3") return [node.name, "s3"];
  if (node.kind === "local") return [short(node.name || node.id), "local path"];
  return [short(node.id), node.kind];
}

function short(text) {
  return text.length > 32 ? `…${text.slice(-31)}` : text;
}

function href(node) {
  if (node.kind === "artifact" && !node.missing) return `#/artifacts/${encodeURIComponent(node.name)}/${node.version}`;
  if (node.kind === "hub" && node.revision) return `https://huggingface.co/${node.name}/tree/${node.revision}`;
  return null;
}

export function lineageSvg(graph) {
  const rows = layers(graph);
  const widest = Math.max(...rows.map((r) => r.length), 1);
  const width = PAD * 2 + widest * W + (widest - 1) * GAP_X;
  const height = PAD * 2 + rows.length * H + (rows.length - 1) * GAP_Y;
  const at = new Map();
  rows.forEach((row, d) => {
    const rowWidth = row.length * W + (row.length - 1) * GAP_X;
    const x0 = (width - rowWidth) / 2;
    row.forEach((node, i) => at.set(node.id, { x: x0 + i * (W + GAP_X), y: PAD + d * (H + GAP_Y) }));
  });
  const root = svg("svg", { class: "lineage", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `lineage of ${graph.root}` });
  for (const e of graph.edges) {
    const a = at.get(e.child);
    const b = at.get(e.parent);
    if (!a || !b) continue;
    const x1 = a.x + W / 2;
    const y1 = a.y + H;
    const x2 = b.x + W / 2;
    const y2 = b.y;
    const my = (y1 + y2) / 2;
    root.append(svg("path", { class: "edge", d: `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`, "data-child": e.child, "data-parent": e.parent }));
    root.append(svg("text", { class: "role", x: (x1 + x2) / 2 + 4, y: my }, e.role));
  }
  for (const node of graph.nodes) {
    const p = at.get(node.id);
    const [title, sub] = label(node);
    const g = svg("g", { class: `node ${node.kind}${node.missing ? " missing" : ""}`, transform: `translate(${p.x},${p.y})`, "data-id": node.id });
    g.append(svg("title", {}, node.id));
    g.append(svg("rect", { width: W, height: H, rx: 6 }));
    g.append(svg("text", { x: 10, y: 19 }, title));
    g.append(svg("text", { class: "sub", x: 10, y: 36 }, sub));
    const link = href(node);
    if (link) {
      const a = svg("a", { href: link });
      if (!link.startsWith("#")) {
        a.setAttribute("target", "_blank");
        a.setAttribute("rel", "noopener noreferrer");
      }
      a.append(g);
      root.append(a);
    } else {
      root.append(g);
    }
  }
  return root;
}

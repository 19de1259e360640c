// Runs the console page itself (gateway/api/console/app.js) under Node.js against a running
// gateway, with a small stand-in for the DOM and the browser's storage, and prints what the
// page shows. `tamper` makes the gateway dishonest between the page and the real answers.
// Usage: node page.mjs PLAN.json
//   PLAN: baseUrl, token, key, storage (a JSON file holding local storage across visits),
//   tamper? ("shift" | "shift_last" | "no_checkpoint"), filters? (searched after opening)
import { readFile, writeFile } from "node:fs/promises";

import { b64encode, entryLeafHash } from "../../gateway/api/console/verify.js";

const plan = JSON.parse(await readFile(process.argv[2], "utf8"));
let kept = {};
try {
  kept = JSON.parse(await readFile(plan.storage, "utf8"));
} catch (error) {
  if (error.code !== "ENOENT") throw error;
}

class Storage {
  constructor(items) { this.items = items; }
  get length() { return Object.keys(this.items).length; }
  key(i) { return Object.keys(this.items)[i] ?? null; }
  getItem(k) { return Object.hasOwn(this.items, k) ? this.items[k] : null; }
  setItem(k, v) { this.items[k] = String(v); }
  removeItem(k) { delete this.items[k]; }
}
globalThis.localStorage = new Storage(kept);
globalThis.sessionStorage = new Storage({});
sessionStorage.setItem("c2c.audit.token", plan.token);
localStorage.setItem("c2c.audit.logKey", plan.key);

let formFields = {};
class Element {
  constructor(tag, id = "") {
    Object.assign(this, { tag, id, textContent: "", className: "", hidden: false, value: "", children: [], listeners: {} });
  }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren() { this.children = []; }
  reset() {}
  get elements() { return { namedItem: () => ({ value: "" }) }; }
}
const elements = {};
globalThis.document = {
  getElementById: (id) => (elements[id] ??= new Element("?", id)),
  createElement: (tag) => new Element(tag),
};
globalThis.FormData = class {
  entries() { return Object.entries(formFields)[Symbol.iterator](); }
};

const realFetch = globalThis.fetch.bind(globalThis);
const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
globalThis.fetch = async (url, init) => {
  const full = plan.baseUrl + url;
  const path = new URL(full).pathname;
  if (plan.tamper === "no_checkpoint" && path === "/api/v1/audit/checkpoint") {
    return json(404, { title: "Not Found", status: 404, detail: "no checkpoint has been signed yet" });
  }
  if (plan.tamper?.startsWith("shift") && path === "/api/v1/audit/entries") {
    // the second entry listed, well inside the checkpoint, rewritten with a matching leaf hash
    // and claimed to be at the checkpoint's size, where no proof can be asked for; kept in its
    // place in the listing, or moved to its end
    const size = (await (await realFetch(`${plan.baseUrl}/api/v1/audit/checkpoint`, init)).json()).size;
    const page = await (await realFetch(full, init)).json();
    const [item] = page.items.splice(1, 1);
    item.entry.outcome = "REWRITTEN";
    item.seq = size;
    item.leaf_hash = b64encode(await entryLeafHash(item.entry));
    page.items.splice(plan.tamper === "shift_last" ? page.items.length : 1, 0, item);
    return json(200, page);
  }
  return realFetch(full, init);
};

const status = (id) => ({ text: elements[id]?.textContent ?? "", kind: elements[id]?.className ?? "" });
const settled = () => {
  const entries = status("entries-status").text;
  return status("access-status").kind.includes("bad") || (entries !== "" && !entries.endsWith("…"));
};
await import("../../gateway/api/console/app.js");
for (let waited = 0; !settled(); waited += 20) {
  if (waited > 60_000) throw new Error(`the page did not settle: ${JSON.stringify(status("entries-status"))}`);
  await new Promise((resolve) => setTimeout(resolve, 20));
}
if (plan.filters) {
  formFields = plan.filters;
  await elements["filter-form"].listeners.submit({ preventDefault() {} });
}

const out = {};
for (const id of ["access-status", "checkpoint-status", "monitor-status", "entries-status"]) out[id] = status(id);
out.rows = (elements["entry-rows"]?.children ?? []).map((tr) => {
  const cells = tr.children;
  const proof = cells.at(-1);
  return { seq: Number(cells[0].textContent), outcome: cells[7].textContent, proof: proof.textContent, kind: proof.className };
});
out.kept = Object.entries(kept)
  .filter(([slot]) => slot.startsWith("c2c.audit.checkpoint:"))
  .map(([, note]) => Number(note.split("\n")[1]));
await writeFile(plan.storage, JSON.stringify(kept));
process.stdout.write(JSON.stringify(out));

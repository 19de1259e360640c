// Runs the console page itself (gateway/api/console/app.js) under Node.js against a running
// gateway, with a small stand-in for the DOM and the browser's storage, and prints what the
// page shows. `tamper` makes the gateway dishonest between the page and the real answers.
// Usage: node page.mjs PLAN.json
//   PLAN: baseUrl, token, key, origin? (the log's, given with a PEM key), witnessKeys? (the
//   partners' keys field), storage (a JSON file holding local storage across visits),
//   tamper? ("shift" | "shift_last" | "no_checkpoint" | "unmatched"), checkpointAnswer? (served in place of
//   the gateway's checkpoint answer), filters? (searched after opening),
//   proofDelay? (ms the gateway takes to answer each inclusion proof),
//   steps? (what the auditor does while the page is still at work, in turn: each waits until
//   rows are shown and `checked` of them have their proof checked, then clicks "more" once,
//   "more_twice" (a double click) or searches `filters` ("filter"))
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
if (plan.origin !== undefined) localStorage.setItem("c2c.audit.logOrigin", plan.origin);
if (plan.witnessKeys !== undefined) localStorage.setItem("c2c.audit.witnessKeys", plan.witnessKeys);

let formFields = {};
class Element {
  constructor(tag, id = "") {
    Object.assign(this, {
      tag, id, textContent: "", className: "", hidden: false, disabled: false, value: "", children: [], listeners: {},
    });
  }
  addEventListener(type, listener) { this.listeners[type] = listener; }
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren(...nodes) { this.children = nodes; }
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
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let inFlight = 0;
globalThis.fetch = async (url, init) => {
  inFlight += 1;
  try {
    return await gateway(url, init);
  } finally {
    inFlight -= 1;
  }
};
async function gateway(url, init) {
  const full = plan.baseUrl + url;
  const path = new URL(full).pathname;
  if (plan.proofDelay && path === "/api/v1/audit/proofs/inclusion") await sleep(plan.proofDelay);
  if (plan.checkpointAnswer && path === "/api/v1/audit/checkpoint") return json(200, plan.checkpointAnswer);
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
  if (plan.tamper === "unmatched" && path === "/api/v1/audit/entries" && new URL(full).search.includes("event=")) {
    // a real entry, with its real proof, that the search does not match, slipped into its page
    const page = await (await realFetch(full, init)).json();
    const all = await (await realFetch(`${plan.baseUrl}/api/v1/audit/entries?limit=500`, init)).json();
    page.items.push(all.items.find((item) => !page.items.some((listed) => listed.seq === item.seq)));
    page.items.sort((a, b) => a.seq - b.seq);
    return json(200, page);
  }
  return realFetch(full, init);
}

const status = (id) => ({ text: elements[id]?.textContent ?? "", kind: elements[id]?.className ?? "" });
const settled = () => {
  const entries = status("entries-status").text;
  return status("access-status").kind.includes("bad") || (entries !== "" && !entries.endsWith("…"));
};
const until = async (done, what) => {
  for (let waited = 0; !done(); waited += 5) {
    if (waited > 60_000) throw new Error(`${what}: ${JSON.stringify(status("entries-status"))}`);
    await sleep(5);
  }
};
const tableRows = () => elements["entry-rows"]?.children ?? [];
// A click as a browser gives it: none on a hidden or disabled button.
const click = (id) => (elements[id].hidden || elements[id].disabled ? null : elements[id].listeners.click({ preventDefault() {} }));
const search = (filters) => {
  formFields = filters;
  return elements["filter-form"].listeners.submit({ preventDefault() {} });
};

await import("../../gateway/api/console/app.js");
if (plan.steps) {
  const actions = [];
  for (const step of plan.steps) {
    await until(
      () => tableRows().length > 0 && tableRows().filter((tr) => tr.children.at(-1).textContent !== "…").length >= step.checked,
      `no ${step.checked} rows checked`,
    );
    if (step.do === "more") actions.push(click("more"));
    else if (step.do === "more_twice") actions.push(click("more"), click("more"));
    else if (step.do === "filter") actions.push(search(step.filters));
    else throw new Error(`unknown step ${JSON.stringify(step)}`);
  }
  await Promise.all(actions);
  // and whatever the page still does by itself (a listing replaced by a search may still be
  // at work): done once it has settled and asked the gateway nothing for 300 ms
  let quietSince = Date.now();
  await until(() => {
    if (!settled() || inFlight > 0) quietSince = Date.now();
    return Date.now() - quietSince >= 300;
  }, "the page did not settle");
} else {
  await until(settled, "the page did not settle");
  if (plan.filters) await search(plan.filters);
}

const out = {};
for (const id of ["access-status", "checkpoint-status", "cosign-status", "monitor-status", "entries-status"]) {
  out[id] = status(id);
}
out.cosigners = (elements["cp-cosigners"]?.children ?? []).map((li) => ({ text: li.textContent, kind: li.className }));
out.more = { hidden: elements.more?.hidden ?? null, disabled: elements.more?.disabled ?? null };
out.rows = (elements["entry-rows"]?.children ?? []).map((tr) => {
  const cells = tr.children;
  const proof = cells.at(-1);
  return {
    seq: Number(cells[0].textContent), event: cells[2].textContent, outcome: cells[7].textContent,
    proof: proof.textContent, kind: proof.className,
  };
});
out.kept = Object.entries(kept)
  .filter(([slot]) => slot.startsWith("c2c.audit.checkpoint:"))
  .map(([, note]) => Number(note.split("\n")[1]));
await writeFile(plan.storage, JSON.stringify(kept));
process.stdout.write(JSON.stringify(out));

// Drives the console's API client (gateway/api/console/client.js) against a running gateway,
// as the page does: verify the latest checkpoint, walk and prove every entry, check earlier
// checkpoints for consistency, export a bundle, run the store check.
// Usage: node live.mjs PLAN.json
//   (baseUrl, token, key, origin?, witness_keys?, old_notes, bundle_path)
import { readFile, writeFile } from "node:fs/promises";

import { AuditClient } from "../../gateway/api/console/client.js";
import { importWitnessKeys } from "../../gateway/api/console/verify.js";

const plan = JSON.parse(await readFile(process.argv[2], "utf8"));
const client = new AuditClient({ baseUrl: plan.baseUrl, token: plan.token });
const out = {};
const failure = (error) => `${error.name}: ${error.message}`;

let checkpoint = null;
let logKey = null;
try {
  const witnesses = await importWitnessKeys(plan.witness_keys ?? "");
  checkpoint = await client.checkpoint(plan.key, { origin: plan.origin, witnesses });
  logKey = checkpoint.logKey;
  out.checkpoint = { origin: checkpoint.origin, size: checkpoint.size, cosigners: checkpoint.cosignatures.length };
  out.cosignatures = checkpoint.cosignatures.map((c) => ({ partner: c.partner, status: c.status, problem: c.problem }));
} catch (error) {
  out.checkpoint = { error: failure(error) };
}

out.entries = [];
let after = null;
do {
  const page = await client.entries({ limit: 7, ...(plan.filters ?? {}) }, after);
  for (const item of page.items) {
    let result;
    try {
      const proven = await client.verifyEntry(item, checkpoint ?? { size: 0 });
      result = proven.covered ? "included" : "after checkpoint";
    } catch (error) {
      result = failure(error);
    }
    out.entries.push({ seq: item.seq, event: item.entry.event, result });
  }
  after = page.next_after;
} while (after !== null);

out.consistency = [];
for (const note of plan.old_notes ?? []) {
  try {
    const result = await client.verifyConsistency(note, logKey, checkpoint);
    out.consistency.push({ ok: true, oldSize: result.oldSize });
  } catch (error) {
    out.consistency.push({ ok: false, error: failure(error) });
  }
}

if (plan.bundle_path) {
  const bundle = await client.exportBundle({});
  await writeFile(plan.bundle_path, new Uint8Array(bundle.data));
  out.bundle = bundle.name;
  const report = await client.storeCheck();
  out.storeCheck = { ok: report.ok, size: report.size };
}

try {
  await new AuditClient({ baseUrl: plan.baseUrl, token: plan.token.slice(0, -4) + "AAAA" }).entries();
  out.badToken = "accepted";
} catch (error) {
  out.badToken = failure(error);
}
process.stdout.write(JSON.stringify(out));

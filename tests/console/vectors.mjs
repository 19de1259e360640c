// Runs the console's verification code (gateway/api/console) on cases the Python side made.
// Usage: node vectors.mjs CASES.json  ->  one JSON array of {ok, value?, error?} on stdout.
import { readFile } from "node:fs/promises";

import { EVENTS, filterMismatch } from "../../gateway/api/console/client.js";
import {
  b64decode,
  b64encode,
  canonicalJson,
  entryLeafHash,
  importLogKey,
  importWitnessKey,
  importWitnessKeys,
  noteInText,
  verifyCheckpoint,
  verifyCosignature,
  verifyConsistency,
  verifyInclusion,
} from "../../gateway/api/console/verify.js";

const bytes = (text) => b64decode(text);

const RUN = {
  canonical: async (c) => canonicalJson(c.value),
  leaf: async (c) => b64encode(await entryLeafHash(c.entry)),
  inclusion: async (c) =>
    verifyInclusion({
      index: c.index, size: c.size, leaf: bytes(c.leaf), proof: c.proof.map(bytes), root: bytes(c.root),
    }),
  consistency: async (c) =>
    verifyConsistency({
      oldSize: c.old_size, size: c.size, oldRoot: bytes(c.old_root), root: bytes(c.root), proof: c.proof.map(bytes),
    }),
  checkpoint: async (c) => {
    const body = await verifyCheckpoint(c.note, await importLogKey(c.key, c.origin));
    return { origin: body.origin, size: body.size, root: b64encode(body.root), time: body.time };
  },
  cosignature: async (c) =>
    verifyCosignature(c.note, await importWitnessKey(c.key), await importLogKey(c.log_key)),
  witness_keys: async (c) => [...(await importWitnessKeys(c.text))].map(([partner, key]) => [partner, key.name]),
  vkey: async (c) => (await importLogKey(c.key, c.origin)).vkey,
  note_in_text: async (c) => noteInText(c.text),
  events: async () => EVENTS,
  filter_mismatch: async (c) => filterMismatch(c.entry, c.filters),
};

const cases = JSON.parse(await readFile(process.argv[2], "utf8"));
const results = [];
for (const c of cases) {
  try {
    const value = await RUN[c.kind](c);
    results.push(value === undefined ? { ok: true } : { ok: true, value });
  } catch (error) {
    results.push({ ok: false, error: `${error.name}: ${error.message}` });
  }
}
process.stdout.write(JSON.stringify(results));

#!/usr/bin/env node
// llmos-generate streams one answer from an llmos gateway and prints it as it arrives.
//
//   LLMOS_API_KEY=... llmos-generate --gateway 127.0.0.1:50051 --model smollm2 "What is 2+2?"
//
// On error it prints the status code and the ErrorInfo reason and exits 1. `--abort-after N`
// cancels the call through its AbortSignal once N responses have arrived; `--ignore-eos` asks
// for all `--max-tokens`.
import { parseArgs } from "node:util";

import { LlmosClient, LlmosError } from "./client.js";

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      gateway: { type: "string", default: "127.0.0.1:50051" },
      model: { type: "string", default: "smollm2-135m-instruct" },
      "max-tokens": { type: "string", default: "64" },
      timeout: { type: "string", default: "60" },
      "abort-after": { type: "string" },
      "ignore-eos": { type: "boolean", default: false },
    },
  });
  const prompt = positionals.join(" ");
  if (!prompt) {
    console.error("usage: llmos-generate [--gateway A] [--model M] [--max-tokens N] [--timeout S] PROMPT");
    return 2;
  }
  const client = new LlmosClient(values.gateway!, process.env.LLMOS_API_KEY ?? "");
  const abort = new AbortController();
  const abortAfter = values["abort-after"] === undefined ? Infinity : Number(values["abort-after"]);
  let pieces = 0;
  let finish = "";
  try {
    const stream = client.generate(
      { model: values.model, messages: [{ role: "user", content: prompt }],
        sampling: { maxTokens: Number(values["max-tokens"]), ignoreEos: values["ignore-eos"] } },
      { signal: abort.signal, timeoutMs: Number(values.timeout) * 1000 });
    for await (const piece of stream) {
      process.stdout.write(piece.text);
      if (piece.finishReason !== "FINISH_REASON_UNSPECIFIED") finish = piece.finishReason;
      if (++pieces >= abortAfter) abort.abort();
    }
    process.stdout.write("\n");
    console.error(`finish: ${finish}`);
    return 0;
  } catch (error) {
    process.stdout.write("\n");
    if (error instanceof LlmosError) {
      console.error(`error: ${error.codeName} reason=${error.reason}: ${error.details}`);
    } else {
      console.error(`error: ${error}`);
    }
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => { process.exitCode = code; });

// A small typed client for llmos's GatewayService on @grpc/grpc-js: a channel that presents an
// API key on every call, Generate as an async iterator of responses that an AbortSignal cancels,
// and failures as LlmosError carrying the google.rpc.ErrorInfo reason of the status.
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { join } from "node:path";
import * as protobuf from "protobufjs";

import type { ProtoGrpcType as GatewayProto } from "./gen/gateway.js";
import type { GatewayServiceClient } from "./gen/llmos/v1/GatewayService.js";
import type { GenerateRequest } from "./gen/llmos/v1/GenerateRequest.js";
import type { GenerateResponse__Output } from "./gen/llmos/v1/GenerateResponse.js";

export type { GenerateRequest, GenerateResponse__Output as GenerateResponse };

const PROTOS = join(__dirname, "proto");
const LOADER_OPTIONS: protoLoader.Options = {
  includeDirs: [PROTOS], longs: String, enums: String, defaults: true, oneofs: true,
};

const gateway = grpc.loadPackageDefinition(
  protoLoader.loadSync("llmos/v1/gateway.proto", LOADER_OPTIONS)) as unknown as GatewayProto;

/** A failed call: its gRPC status code (and name), message and ErrorInfo reason (the code's
 * name when the status carried none, as a transport failure does). */
export class LlmosError extends Error {
  constructor(readonly code: grpc.status, readonly details: string, readonly reason: string) {
    super(`${grpc.status[code]} (${reason}): ${details}`);
    this.name = "LlmosError";
  }

  get codeName(): string {
    return grpc.status[this.code];
  }

  static of(error: grpc.ServiceError): LlmosError {
    // A status without ErrorInfo (a transport failure) gives its code's name, as the other clients do.
    return new LlmosError(error.code, error.details, reasonOf(error.metadata) || grpc.status[error.code]);
  }
}

const errorDetails = new protobuf.Root();
errorDetails.resolvePath = (_origin, target) => join(PROTOS, target);
errorDetails.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = errorDetails.lookupType("google.rpc.Status");
const ErrorInfo = errorDetails.lookupType("google.rpc.ErrorInfo");

/** The ErrorInfo reason in a status's `grpc-status-details-bin` (a google.rpc.Status). */
function reasonOf(metadata: grpc.Metadata | undefined): string {
  const raw = metadata?.get("grpc-status-details-bin")[0];
  if (!Buffer.isBuffer(raw)) return "";
  // google.protobuf.Any comes from protobufjs's bundled definitions, which keep `type_url`.
  const status = Status.decode(raw) as unknown as { details: { type_url: string; value: Uint8Array }[] };
  for (const any of status.details ?? []) {
    if (any.type_url.endsWith("/google.rpc.ErrorInfo")) {
      return (ErrorInfo.decode(any.value) as unknown as { reason: string }).reason;
    }
  }
  return "";
}

export interface CallOptions {
  /** Aborting it cancels the call, on the server too. */
  signal?: AbortSignal;
  /** The call's deadline, in milliseconds from now. */
  timeoutMs?: number;
}

export class LlmosClient {
  readonly gateway: GatewayServiceClient;

  /** A plaintext channel to the gateway at `address` (its public port on loopback); every call
   * carries `apiKey` as `authorization: Bearer`. */
  constructor(address: string, private readonly apiKey = "") {
    this.gateway = new gateway.llmos.v1.GatewayService(address, grpc.credentials.createInsecure());
  }

  close(): void {
    this.gateway.close();
  }

  /** The answer to `request`, one response at a time as the server streams them. */
  async *generate(request: GenerateRequest, options: CallOptions = {}): AsyncGenerator<GenerateResponse__Output> {
    const metadata = new grpc.Metadata();
    if (this.apiKey) metadata.set("authorization", `Bearer ${this.apiKey}`);
    const callOptions: grpc.CallOptions = {};
    if (options.timeoutMs !== undefined) callOptions.deadline = new Date(Date.now() + options.timeoutMs);
    const call = this.gateway.Generate(request, metadata, callOptions);
    const cancel = () => call.cancel();
    options.signal?.addEventListener("abort", cancel, { once: true });
    try {
      if (options.signal?.aborted) call.cancel();
      for await (const response of call) yield response as GenerateResponse__Output;
    } catch (error) {
      throw "code" in (error as object) ? LlmosError.of(error as grpc.ServiceError) : error;
    } finally {
      options.signal?.removeEventListener("abort", cancel);
      call.cancel();
    }
  }
}

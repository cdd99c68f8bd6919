// Builds the client: TypeScript types generated from llmos's protos (proto-loader-gen-types),
// then tsc. The .proto files the client loads at run time are copied beside the output, so
// dist/ needs nothing else. GOOGLEAPIS_PROTOS names a directory holding google/rpc/*.proto.
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const protos = join(here, "..", "..", "protos");
const googleapis = process.env.GOOGLEAPIS_PROTOS;
if (!googleapis || !existsSync(join(googleapis, "google", "rpc", "error_details.proto"))) {
  console.error("GOOGLEAPIS_PROTOS must name a directory holding google/rpc/error_details.proto");
  process.exit(2);
}
const files = [
  [protos, "llmos/v1/common.proto"],
  [protos, "llmos/v1/gateway.proto"],
  [googleapis, "google/rpc/status.proto"],
  [googleapis, "google/rpc/error_details.proto"],
];
const bin = (name) => join(here, "node_modules", ".bin", name);
rmSync(join(here, "src", "gen"), { recursive: true, force: true });
rmSync(join(here, "dist"), { recursive: true, force: true });
for (const [root, file] of files) {
  mkdirSync(dirname(join(here, "dist", "proto", file)), { recursive: true });
  cpSync(join(root, file), join(here, "dist", "proto", file));
}
execFileSync(bin("proto-loader-gen-types"), [
  "--grpcLib=@grpc/grpc-js", "--outDir=src/gen", "--longs=String", "--enums=String", "--defaults", "--oneofs",
  `-I${protos}`, "llmos/v1/gateway.proto",
], { cwd: here, stdio: "inherit" });
execFileSync(bin("tsc"), ["-p", "tsconfig.json"], { cwd: here, stdio: "inherit" });

// A small typed client for llmos's GatewayService: a channel that presents an API key on every
// call, Generate as a stream of responses handed to a callback, and failures carrying the
// google.rpc.ErrorInfo reason the suite puts in every status it returns.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "llmos/v1/gateway.grpc.pb.h"

namespace llmos {

// A failed call: its gRPC code, message and ErrorInfo reason (the code's name when the status
// carried none, as a transport failure does).
struct Error {
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;
  std::string reason;
  bool ok() const { return code == grpc::StatusCode::OK; }
  // The code as google.rpc.Code spells it: "NOT_FOUND", "UNAUTHENTICATED".
  std::string code_name() const;
};

class Client {
 public:
  // A plaintext channel to the gateway at `address` (its public port on loopback); every call
  // carries `api_key` as `authorization: Bearer`.
  Client(const std::string& address, std::string api_key);

  // Streams the answer to `request`, calling `on_piece` for each response as it arrives, within
  // `timeout`. Returns the call's outcome.
  Error Generate(const v1::GenerateRequest& request,
                 const std::function<void(const v1::GenerateResponse&)>& on_piece,
                 std::chrono::milliseconds timeout);

 private:
  std::string api_key_;
  std::unique_ptr<v1::GatewayService::Stub> stub_;
};

// The code, message and ErrorInfo reason of `status`.
Error ErrorOf(const grpc::Status& status);

}  // namespace llmos

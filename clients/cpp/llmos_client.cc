#include "llmos_client.h"

#include "google/rpc/code.pb.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace llmos {

Client::Client(const std::string& address, std::string api_key)
    : api_key_(std::move(api_key)),
      stub_(v1::GatewayService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))) {}

Error Client::Generate(const v1::GenerateRequest& request,
                       const std::function<void(const v1::GenerateResponse&)>& on_piece,
                       std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  if (!api_key_.empty()) context.AddMetadata("authorization", "Bearer " + api_key_);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = stub_->Generate(&context, request);
  v1::GenerateResponse piece;
  while (reader->Read(&piece)) on_piece(piece);
  return ErrorOf(reader->Finish());
}

std::string Error::code_name() const { return google::rpc::Code_Name(static_cast<google::rpc::Code>(code)); }

Error ErrorOf(const grpc::Status& status) {
  Error error{status.error_code(), status.error_message(), ""};
  google::rpc::Status details;
  if (!status.error_details().empty() && details.ParseFromString(status.error_details())) {
    for (const auto& any : details.details()) {
      google::rpc::ErrorInfo info;
      if (any.UnpackTo(&info)) error.reason = info.reason();
    }
  }
  // A status without ErrorInfo (a transport failure): its code, as the other clients say.
  if (error.reason.empty() && !error.ok()) error.reason = error.code_name();
  return error;
}

}  // namespace llmos

// llmos-generate streams one answer from an llmos gateway and prints it as it arrives.
//
//   LLMOS_API_KEY=... llmos-generate --gateway 127.0.0.1:50051 --model smollm2 "What is 2+2?"
//
// On error it prints the status code and the ErrorInfo reason and exits 1.
#include <cstdlib>
#include <iostream>
#include <string>

#include "llmos_client.h"

int main(int argc, char** argv) {
  std::string gateway = "127.0.0.1:50051", model = "smollm2-135m-instruct", prompt;
  int max_tokens = 64, timeout_s = 60;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) { std::cerr << arg << " needs a value\n"; std::exit(2); }
      return argv[++i];
    };
    if (arg == "--gateway") gateway = value();
    else if (arg == "--model") model = value();
    else if (arg == "--max-tokens") max_tokens = std::stoi(value());
    else if (arg == "--timeout") timeout_s = std::stoi(value());
    else prompt += (prompt.empty() ? "" : " ") + arg;
  }
  if (prompt.empty()) {
    std::cerr << "usage: llmos-generate [--gateway A] [--model M] [--max-tokens N] [--timeout S] PROMPT\n";
    return 2;
  }
  const char* key = std::getenv("LLMOS_API_KEY");
  llmos::Client client(gateway, key ? key : "");
  llmos::v1::GenerateRequest request;
  request.set_model(model);
  auto* message = request.add_messages();
  message->set_role("user");
  message->set_content(prompt);
  request.mutable_sampling()->set_max_tokens(max_tokens);
  llmos::v1::FinishReason finish = llmos::v1::FINISH_REASON_UNSPECIFIED;
  llmos::Error error = client.Generate(
      request,
      [&](const llmos::v1::GenerateResponse& piece) {
        std::cout << piece.text() << std::flush;
        if (piece.finish_reason() != llmos::v1::FINISH_REASON_UNSPECIFIED) finish = piece.finish_reason();
      },
      std::chrono::seconds(timeout_s));
  std::cout << std::endl;
  if (!error.ok()) {
    std::cerr << "error: " << error.code_name() << " reason=" << error.reason << ": " << error.message << "\n";
    return 1;
  }
  std::cerr << "finish: " << llmos::v1::FinishReason_Name(finish) << "\n";
  return 0;
}

// llmos-generate streams one answer from an llmos gateway and prints it as it arrives.
//
//	LLMOS_API_KEY=... llmos-generate -gateway 127.0.0.1:50051 -model smollm2 "What is the capital of France?"
//
// On error it prints the status code and the ErrorInfo reason and exits 1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"llmos.dev/client/llmos"
	llmosv1 "llmos.dev/gen/llmosv1"
)

func main() {
	gateway := flag.String("gateway", "127.0.0.1:50051", "the gateway's address")
	model := flag.String("model", "smollm2-135m-instruct", "the model to ask")
	maxTokens := flag.Int("max-tokens", 64, "at most this many tokens")
	timeout := flag.Duration("timeout", 60*time.Second, "the call's deadline")
	flag.Parse()
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		fmt.Fprintln(os.Stderr, "usage: llmos-generate [flags] PROMPT")
		os.Exit(2)
	}
	client, err := llmos.Dial(*gateway, os.Getenv("LLMOS_API_KEY"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	request := &llmosv1.GenerateRequest{
		Model:    *model,
		Messages: []*llmosv1.ChatMessage{{Role: "user", Content: prompt}},
		Sampling: &llmosv1.SamplingParams{MaxTokens: int32(*maxTokens)},
	}
	var finish llmosv1.FinishReason
	err = client.Generate(ctx, request, func(piece *llmos.Piece) {
		os.Stdout.WriteString(piece.Text)
		if piece.FinishReason != llmosv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			finish = piece.FinishReason
		}
	})
	fmt.Println()
	var failed *llmos.Error
	if errors.As(err, &failed) {
		fmt.Fprintf(os.Stderr, "error: %s reason=%s: %s\n", failed.CodeName(), failed.Reason, failed.Message)
		os.Exit(1)
	} else if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, "finish:", finish)
}

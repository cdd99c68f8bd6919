// Package llmos is a small typed client for llmos's GatewayService: a channel that presents an
// API key on every call, Generate as a stream of text pieces, and errors carrying the
// google.rpc.ErrorInfo reason the suite puts in every status it returns.
package llmos

import (
	"context"
	"errors"
	"fmt"
	"io"

	rpccode "google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	llmosv1 "llmos.dev/gen/llmosv1"
)

// Client talks to one gateway.
type Client struct {
	conn    *grpc.ClientConn
	Gateway llmosv1.GatewayServiceClient
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: the gateway's public port on loopback is plaintext.
func (bearer) RequireTransportSecurity() bool { return false }

// Dial opens a plaintext channel to the gateway at address; every call carries apiKey.
func Dial(address, apiKey string) (*Client, error) {
	opts := []grpc.DialOption{grpc.WithInsecure()}
	if apiKey != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(credentials.PerRPCCredentials(bearer(apiKey))))
	}
	conn, err := grpc.Dial(address, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, Gateway: llmosv1.NewGatewayServiceClient(conn)}, nil
}

// Close closes the channel.
func (c *Client) Close() error { return c.conn.Close() }

// Piece is one streamed response: its text, and the finish reason on the last one.
type Piece = llmosv1.GenerateResponse

// Generate streams the answer to request, calling onPiece for each response as it arrives.
// Cancel ctx (or give it a deadline) to stop the generation on the server too.
func (c *Client) Generate(ctx context.Context, request *llmosv1.GenerateRequest, onPiece func(*Piece)) error {
	stream, err := c.Gateway.Generate(ctx, request)
	if err != nil {
		return asError(err)
	}
	for {
		piece, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return asError(err)
		}
		onPiece(piece)
	}
}

// Error is a failed call: its gRPC code, message and the ErrorInfo reason (the code's name when
// the status carried none, as a transport failure does).
type Error struct {
	Code    codes.Code
	Message string
	Reason  string
}

// CodeName is the code as google.rpc.Code spells it: "NOT_FOUND", "UNAUTHENTICATED".
func (e *Error) CodeName() string { return rpccode.Code_name[int32(e.Code)] }

func (e *Error) Error() string {
	return fmt.Sprintf("%s (%s): %s", e.CodeName(), e.Reason, e.Message)
}

func asError(err error) error {
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	out := &Error{Code: s.Code(), Message: s.Message()}
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			out.Reason = info.Reason
		}
	}
	if out.Reason == "" { // a status without ErrorInfo (a transport failure): its code, as the other clients say
		out.Reason = out.CodeName()
	}
	return out
}

package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"cocoon/agent/internal/apierr"
)

// Limits of POST /hook (PROTOCOL.md).
const (
	maxHookBody     = 64 << 10 // request body sent to the app
	maxHookAnswer   = 4 << 10  // answer body returned to the host
	maxHookTimeout  = 60_000   // ms
	maxHookPathSize = 256
)

type hookRequest struct {
	Port        int    `json:"port"`
	Path        string `json:"path"`
	Body        string `json:"body"` // standard base64
	ContentType string `json:"contentType"`
	TimeoutMs   int64  `json:"timeoutMs"`
}

// hookAnswer reports what the app did: Status and Body when it answered,
// Error (and TimedOut) when it did not. Either way the call itself is 200:
// a failing hook is the app's outcome, not the agent's.
type hookAnswer struct {
	Status     int    `json:"status,omitempty"`
	Body       string `json:"body,omitempty"` // base64, at most maxHookAnswer bytes
	Truncated  bool   `json:"truncated,omitempty"`
	Error      string `json:"error,omitempty"`
	TimedOut   bool   `json:"timedOut,omitempty"`
	DurationMs int64  `json:"durationMs"`
}

// hookTransport never keeps connections (a snapshot would freeze them) and
// ignores proxy settings of the guest's environment: the target is always
// the guest's own loopback.
var hookTransport = &http.Transport{DisableKeepAlives: true, Proxy: nil}

// hook makes the lifecycle hook call the host asked for: an HTTP POST to
// 127.0.0.1:port inside the guest, bounded by timeoutMs.
func (s *Server) hook(w http.ResponseWriter, r *http.Request) {
	var req hookRequest
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	body, err := req.validate()
	if err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, callHook(r.Context(), req, body))
}

func (req *hookRequest) validate() ([]byte, error) {
	if req.Port < 1 || req.Port > 65535 {
		return nil, apierr.BadRequest(fmt.Sprintf("port must be between 1 and 65535, got %d", req.Port))
	}
	if !strings.HasPrefix(req.Path, "/") || len(req.Path) > maxHookPathSize || strings.ContainsAny(req.Path, " ?#\x00\r\n\t") {
		return nil, apierr.BadRequest(fmt.Sprintf("path must start with / and hold at most %d characters without spaces, ? or #", maxHookPathSize))
	}
	if req.TimeoutMs < 1 || req.TimeoutMs > maxHookTimeout {
		return nil, apierr.BadRequest(fmt.Sprintf("timeoutMs must be between 1 and %d, got %d", maxHookTimeout, req.TimeoutMs))
	}
	if strings.ContainsAny(req.ContentType, "\r\n\x00") || len(req.ContentType) > 128 {
		return nil, apierr.BadRequest("contentType must be a single line of at most 128 characters")
	}
	body, err := base64.StdEncoding.DecodeString(req.Body)
	if err != nil {
		return nil, apierr.BadRequest("body must be base64: " + err.Error())
	}
	if len(body) > maxHookBody {
		return nil, apierr.BadRequest(fmt.Sprintf("body holds at most %d bytes, got %d", maxHookBody, len(body)))
	}
	return body, nil
}

func callHook(parent context.Context, req hookRequest, body []byte) hookAnswer {
	started := time.Now()
	ctx, cancel := context.WithTimeout(parent, time.Duration(req.TimeoutMs)*time.Millisecond)
	defer cancel()
	answer := func(a hookAnswer) hookAnswer {
		a.DurationMs = time.Since(started).Milliseconds()
		return a
	}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d%s", req.Port, req.Path), bytes.NewReader(body))
	if err != nil {
		return answer(hookAnswer{Error: err.Error()})
	}
	if req.ContentType != "" {
		httpReq.Header.Set("Content-Type", req.ContentType)
	}
	resp, err := hookTransport.RoundTrip(httpReq)
	if err != nil {
		return answer(hookAnswer{Error: err.Error(), TimedOut: errors.Is(ctx.Err(), context.DeadlineExceeded)})
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(io.LimitReader(resp.Body, maxHookAnswer+1))
	if err != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return answer(hookAnswer{Status: resp.StatusCode, Error: "reading the answer: " + err.Error()})
	}
	truncated := len(got) > maxHookAnswer
	if truncated {
		got = got[:maxHookAnswer]
	}
	return answer(hookAnswer{Status: resp.StatusCode, Body: base64.StdEncoding.EncodeToString(got), Truncated: truncated})
}

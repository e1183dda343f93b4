package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"cocoon/agent/internal/restore"
)

const testToken = "test-secret"

// fakeSystem records restore operations instead of touching the host.
type fakeSystem struct {
	mu       sync.Mutex
	entropy  []byte
	timeNs   int64
	hostname string
}

func (f *fakeSystem) system(machineID string) *restore.System {
	return &restore.System{
		AddEntropy: func(b []byte) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.entropy = append([]byte(nil), b...)
			return nil
		},
		SetTime: func(ns int64) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.timeNs = ns
			return nil
		},
		SetHostname: func(h string) error {
			f.mu.Lock()
			defer f.mu.Unlock()
			f.hostname = h
			return nil
		},
		MachineIDPath: machineID,
	}
}

type harness struct {
	t    *testing.T
	srv  *Server
	http *httptest.Server
	fake *fakeSystem
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	fake := &fakeSystem{}
	srv := New(Options{Token: testToken, Restore: fake.system("")})
	// Fast restarts and stops keep the app tests quick.
	srv.App().BackoffMin = 50 * time.Millisecond
	srv.App().BackoffMax = 200 * time.Millisecond
	srv.App().StopGrace = 300 * time.Millisecond
	ts := httptest.NewServer(srv)
	t.Cleanup(func() {
		srv.Close()
		ts.Close()
	})
	return &harness{t: t, srv: srv, http: ts, fake: fake}
}

func (h *harness) req(method, path string, body io.Reader, token string) *http.Response {
	h.t.Helper()
	r, err := http.NewRequest(method, h.http.URL+path, body)
	if err != nil {
		h.t.Fatal(err)
	}
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := h.http.Client().Do(r)
	if err != nil {
		h.t.Fatal(err)
	}
	return resp
}

// do sends a JSON (or raw) body with the test token and decodes a JSON
// answer into out (if non-nil); it returns the status.
func (h *harness) do(method, path string, body interface{}, out interface{}) int {
	h.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	resp := h.req(method, path, rd, testToken)
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			h.t.Fatalf("%s %s: decoding %q: %v", method, path, data, err)
		}
	}
	return resp.StatusCode
}

type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

type event struct {
	Type       string `json:"type"`
	Pid        int    `json:"pid"`
	Data       []byte `json:"data"`
	ExitCode   int    `json:"exitCode"`
	Signal     string `json:"signal"`
	TimedOut   bool   `json:"timedOut"`
	DurationMs int64  `json:"durationMs"`
}

type execResult struct {
	pid    int
	stdout string
	stderr string
	exit   event
	events []event
}

// readEvents parses an NDJSON exec stream to its end.
func readEvents(t *testing.T, r io.Reader) execResult {
	t.Helper()
	var res execResult
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("bad line %q: %v", sc.Text(), err)
		}
		res.events = append(res.events, e)
		switch e.Type {
		case "started":
			res.pid = e.Pid
		case "stdout":
			res.stdout += string(e.Data)
		case "stderr":
			res.stderr += string(e.Data)
		case "exit":
			res.exit = e
		}
	}
	if len(res.events) < 2 || res.events[0].Type != "started" || res.events[len(res.events)-1].Type != "exit" {
		t.Fatalf("stream must start with started and end with exit: %+v", res.events)
	}
	return res
}

func (h *harness) exec(body interface{}) execResult {
	h.t.Helper()
	j, _ := json.Marshal(body)
	resp := h.req("POST", "/exec", bytes.NewReader(j), testToken)
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		h.t.Fatalf("exec %s: %d %s", j, resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		h.t.Fatalf("content-type %q", ct)
	}
	return readEvents(h.t, resp.Body)
}

func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

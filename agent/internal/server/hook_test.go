package server

import (
	"encoding/base64"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// appOnLoopback serves h on 127.0.0.1 (where /hook sends) and returns its port.
func appOnLoopback(t *testing.T, h http.HandlerFunc) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

func TestHookCallsTheAppAndReportsItsAnswer(t *testing.T) {
	h := newHarness(t)
	type seen struct{ method, path, contentType, body string }
	got := make(chan seen, 1)
	port := appOnLoopback(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{r.Method, r.URL.Path, r.Header.Get("Content-Type"), string(b)}
		w.WriteHeader(201)
		_, _ = w.Write([]byte(strings.Repeat("x", maxHookAnswer+10)))
	})
	var a hookAnswer
	st := h.do("POST", "/hook", map[string]interface{}{
		"port": port, "path": "/run", "body": base64.StdEncoding.EncodeToString([]byte(`{"session":"s-1"}`)), "contentType": "application/json", "timeoutMs": 5000,
	}, &a)
	if st != 200 || a.Status != 201 || a.Error != "" || !a.Truncated {
		t.Fatalf("hook: %d %+v", st, a)
	}
	if body, _ := base64.StdEncoding.DecodeString(a.Body); len(body) != maxHookAnswer {
		t.Fatalf("answer body capped at %d, got %d", maxHookAnswer, len(body))
	}
	if s := <-got; s.method != "POST" || s.path != "/run" || s.contentType != "application/json" || s.body != `{"session":"s-1"}` {
		t.Fatalf("the app saw %+v", s)
	}
}

func TestHookReportsTimeoutsAndRefusals(t *testing.T) {
	h := newHarness(t)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	slow := appOnLoopback(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
	})
	var a hookAnswer
	started := time.Now()
	if st := h.do("POST", "/hook", map[string]interface{}{"port": slow, "path": "/suspend", "timeoutMs": 300}, &a); st != 200 || !a.TimedOut || a.Error == "" || a.Status != 0 {
		t.Fatalf("slow hook: %d %+v", st, a)
	}
	if d := time.Since(started); d > 3*time.Second {
		t.Fatalf("the timeout was not kept: %v", d)
	}

	// A port nothing listens on: refused at once, not a timeout.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	a = hookAnswer{}
	if st := h.do("POST", "/hook", map[string]interface{}{"port": closed, "path": "/ready", "timeoutMs": 2000}, &a); st != 200 || a.TimedOut || a.Error == "" {
		t.Fatalf("refused hook: %d %+v", st, a)
	}
}

func TestHookRefusesBadRequests(t *testing.T) {
	h := newHarness(t)
	for _, body := range []map[string]interface{}{
		{"port": 0, "path": "/run", "timeoutMs": 1000},
		{"port": 70000, "path": "/run", "timeoutMs": 1000},
		{"port": 8080, "path": "run", "timeoutMs": 1000},
		{"port": 8080, "path": "/run?x=1", "timeoutMs": 1000},
		{"port": 8080, "path": "/" + strings.Repeat("a", maxHookPathSize), "timeoutMs": 1000},
		{"port": 8080, "path": "/run", "timeoutMs": 0},
		{"port": 8080, "path": "/run", "timeoutMs": maxHookTimeout + 1},
		{"port": 8080, "path": "/run", "timeoutMs": 1000, "body": "%%%"},
		{"port": 8080, "path": "/run", "timeoutMs": 1000, "body": base64.StdEncoding.EncodeToString(make([]byte, maxHookBody+1))},
		{"port": 8080, "path": "/run", "timeoutMs": 1000, "contentType": "a\r\nX-Evil: 1"},
	} {
		var e apiError
		if st := h.do("POST", "/hook", body, &e); st != 400 || e.Error.Code != "BadRequest" {
			t.Fatalf("%v: %d %+v", body, st, e)
		}
	}
	if st := h.do("GET", "/hook", nil, nil); st != 405 {
		t.Fatalf("GET /hook: %d", st)
	}
}

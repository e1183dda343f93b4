package server

import (
	"bufio"
	"encoding/binary"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// dialPTY performs the upgrade by hand, as a client of the protocol would.
func dialPTY(t *testing.T, h *harness, q url.Values) (net.Conn, *bufio.Reader) {
	t.Helper()
	u, _ := url.Parse(h.http.URL)
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET /pty?" + q.Encode() + " HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer " + testToken +
		"\r\nConnection: Upgrade\r\nUpgrade: cocoon-pty\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), "cocoon-pty") {
		t.Fatalf("upgrade: %d %v", resp.StatusCode, resp.Header)
	}
	return conn, br
}

// readUntilExit collects data frames until the exit frame, and checks that
// the agent closes the connection after it.
func readUntilExit(t *testing.T, br *bufio.Reader) (string, int32) {
	t.Helper()
	var out strings.Builder
	for {
		typ, p, err := ReadFrame(br)
		if err != nil {
			t.Fatalf("reading frames (output so far %q): %v", out.String(), err)
		}
		switch typ {
		case FrameData:
			out.Write(p)
		case FrameExit:
			if len(p) != 4 {
				t.Fatalf("exit frame of %d bytes", len(p))
			}
			if _, _, err := ReadFrame(br); err == nil {
				t.Fatal("frame after exit")
			}
			return out.String(), int32(binary.BigEndian.Uint32(p))
		default:
			t.Fatalf("unexpected frame type %d", typ)
		}
	}
}

func TestPTY(t *testing.T) {
	h := newHarness(t)

	_, br := dialPTY(t, h, url.Values{"cmd": {"echo hi; exit 3"}})
	out, code := readUntilExit(t, br)
	if !strings.Contains(out, "hi") || code != 3 {
		t.Fatalf("pty: %q exit %d", out, code)
	}

	// Initial size, a resize frame, input, and a real tty on the other end.
	conn, br := dialPTY(t, h, url.Values{"cmd": {"stty size; read x; stty size; test -t 0 && echo tty:$x"}, "cols": {"100"}, "rows": {"40"}})
	var first strings.Builder
	for !strings.Contains(first.String(), "40 100") {
		typ, p, err := ReadFrame(br)
		if err != nil || typ != FrameData {
			t.Fatalf("waiting for initial size (got %q): type %d, %v", first.String(), typ, err)
		}
		first.Write(p)
	}
	resize := make([]byte, 4)
	binary.BigEndian.PutUint16(resize[0:], 132)
	binary.BigEndian.PutUint16(resize[2:], 50)
	msg := AppendFrame(nil, FrameResize, resize)
	msg = AppendFrame(msg, FrameData, []byte("abc\n"))
	if _, err := conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	out, code = readUntilExit(t, br)
	if !strings.Contains(out, "50 132") || !strings.Contains(out, "tty:abc") || code != 0 {
		t.Fatalf("interactive pty: %q exit %d", out, code)
	}

	// No upgrade headers: a plain JSON error.
	var e apiError
	if st := h.do("GET", "/pty", nil, &e); st != 400 || e.Error.Code != "BadRequest" {
		t.Fatalf("pty without upgrade: %d %+v", st, e)
	}
}

type appStatus struct {
	State     string `json:"state"`
	Pid       int    `json:"pid"`
	Restarts  int    `json:"restarts"`
	ExitCode  *int   `json:"exitCode"`
	StartedAt string `json:"startedAt"`
}

func (h *harness) app() appStatus {
	var st appStatus
	if code := h.do("GET", "/app", nil, &st); code != 200 {
		h.t.Fatalf("GET /app: %d", code)
	}
	return st
}

func (h *harness) logs() string {
	resp := h.req("GET", "/logs", nil, testToken)
	defer resp.Body.Close()
	var b strings.Builder
	_, _ = bufio.NewReader(resp.Body).WriteTo(&b)
	return b.String()
}

func TestAppRestartAndLogs(t *testing.T) {
	h := newHarness(t)
	if st := h.app(); st.State != "none" {
		t.Fatalf("initial: %+v", st)
	}
	var st appStatus
	if code := h.do("POST", "/app", map[string]interface{}{
		"argv": []string{"sh", "-c", "echo app-out; echo app-err >&2; exit 1"}, "restart": "on-failure",
	}, &st); code != 200 || st.Pid <= 0 || st.StartedAt == "" {
		t.Fatalf("start: %d %+v", code, st)
	}
	waitUntil(t, 5*time.Second, "two restarts", func() bool { return h.app().Restarts >= 2 })
	st = h.app()
	if st.ExitCode == nil || *st.ExitCode != 1 {
		t.Fatalf("after restarts: %+v", st)
	}
	if l := h.logs(); strings.Count(l, "app-out\n") < 2 || !strings.Contains(l, "app-err\n") {
		t.Fatalf("logs: %q", l)
	}
	if code := h.do("DELETE", "/app", nil, nil); code != 200 {
		t.Fatalf("delete: %d", code)
	}
	if st := h.app(); st.State != "none" {
		t.Fatalf("after delete: %+v", st)
	}

	// "no": a clean exit stays exited.
	h.do("POST", "/app", map[string]interface{}{"argv": []string{"true"}, "restart": "no"}, nil)
	waitUntil(t, 5*time.Second, "exit", func() bool { return h.app().State == "exited" })
	time.Sleep(150 * time.Millisecond)
	if st := h.app(); st.Restarts != 0 || st.ExitCode == nil || *st.ExitCode != 0 || st.Pid != 0 {
		t.Fatalf("restart=no: %+v", st)
	}

	var e apiError
	if code := h.do("POST", "/app", map[string]interface{}{"argv": []string{"nosuchcmd"}}, &e); code != 400 || e.Error.Code != "CommandNotFound" {
		t.Fatalf("bad app: %d %+v", code, e)
	}
	if code := h.do("POST", "/app", map[string]interface{}{"argv": []string{"true"}, "restart": "sometimes"}, &e); code != 400 {
		t.Fatalf("bad policy: %d", code)
	}
}

func TestAppFollowAndStop(t *testing.T) {
	h := newHarness(t)
	// Ignores SIGTERM, so DELETE has to escalate to SIGKILL.
	h.do("POST", "/app", map[string]interface{}{
		"argv": []string{"sh", "-c", `trap "" TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done`},
	}, nil)
	resp := h.req("GET", "/logs?follow=true", nil, testToken)
	br := bufio.NewReader(resp.Body)
	for seen := 0; seen < 3; {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("follow: %v", err)
		}
		if strings.HasPrefix(line, "tick ") {
			seen++
		}
	}
	resp.Body.Close()
	if st := h.app(); st.State != "running" {
		t.Fatalf("state: %+v", st)
	}
	start := time.Now()
	if code := h.do("DELETE", "/app", nil, nil); code != 200 {
		t.Fatalf("delete: %d", code)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
		t.Fatalf("stop took %v (grace 300ms)", d)
	}
	if st := h.app(); st.State != "none" {
		t.Fatalf("after delete: %+v", st)
	}
}

func TestAppStopSignal(t *testing.T) {
	h := newHarness(t)
	// Exits cleanly on SIGINT, ignores SIGTERM: a quick stop proves SIGINT was sent.
	h.do("POST", "/app", map[string]interface{}{
		"argv":       []string{"sh", "-c", `trap "exit 0" INT; trap "" TERM; echo ready; while true; do sleep 0.05; done`},
		"stopSignal": "SIGINT",
	}, nil)
	waitUntil(t, 5*time.Second, "ready", func() bool { return strings.Contains(h.logs(), "ready") })
	start := time.Now()
	if code := h.do("DELETE", "/app", nil, nil); code != 200 {
		t.Fatalf("delete: %d", code)
	}
	if d := time.Since(start); d >= 250*time.Millisecond {
		t.Fatalf("stop took %v: SIGINT was not sent (grace 300ms)", d)
	}
	var e apiError
	if code := h.do("POST", "/app", map[string]interface{}{"argv": []string{"true"}, "stopSignal": "SIGNOPE"}, &e); code != 400 || !strings.Contains(e.Error.Message, "stopSignal") {
		t.Fatalf("bad stopSignal: %d %+v", code, e)
	}
}

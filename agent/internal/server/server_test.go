package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cocoon/agent/internal/restore"
)

func TestHealthAndAuth(t *testing.T) {
	h := newHarness(t)
	var health struct {
		Status   string `json:"status"`
		Version  string `json:"version"`
		UptimeMs *int64 `json:"uptimeMs"`
	}
	resp := h.req("GET", "/health", nil, "")
	if resp.StatusCode != 200 {
		t.Fatalf("health: %d", resp.StatusCode)
	}
	_ = json.NewDecoder(resp.Body).Decode(&health)
	resp.Body.Close()
	if health.Status != "ok" || health.Version != Version || health.UptimeMs == nil {
		t.Fatalf("health: %+v", health)
	}

	for _, tok := range []string{"", "wrong", testToken + "x"} {
		resp := h.req("GET", "/env", nil, tok)
		var e apiError
		_ = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != 401 || e.Error.Code != "Unauthorized" {
			t.Fatalf("token %q: %d %+v", tok, resp.StatusCode, e)
		}
	}
	// Routes are not revealed to unauthenticated clients.
	if resp := h.req("GET", "/nosuchroute", nil, ""); resp.StatusCode != 401 {
		t.Fatalf("unknown route without token: %d", resp.StatusCode)
	}
	var e apiError
	if st := h.do("GET", "/nosuchroute", nil, &e); st != 404 || e.Error.Code != "NotFound" {
		t.Fatalf("unknown route: %d %+v", st, e)
	}
	if st := h.do("DELETE", "/exec", nil, &e); st != 405 {
		t.Fatalf("wrong method: %d", st)
	}

	h.srv.SetDegraded("boot: root: no disk")
	resp = h.req("GET", "/health", nil, "")
	var deg map[string]interface{}
	_ = json.NewDecoder(resp.Body).Decode(&deg)
	resp.Body.Close()
	if deg["status"] != "degraded" || deg["error"] != "boot: root: no disk" {
		t.Fatalf("degraded health: %v", deg)
	}
}

func TestExecArgvExitCodes(t *testing.T) {
	h := newHarness(t)
	r := h.exec(map[string]interface{}{"argv": []string{"sh", "-c", "echo out; echo err >&2; exit 3"}})
	if r.stdout != "out\n" || r.stderr != "err\n" || r.exit.ExitCode != 3 || r.exit.Signal != "" || r.exit.TimedOut {
		t.Fatalf("argv: %+v", r)
	}
	if r.pid <= 0 {
		t.Fatalf("no pid: %+v", r.events[0])
	}
	r = h.exec(map[string]interface{}{"argv": []string{"true"}})
	if r.exit.ExitCode != 0 {
		t.Fatalf("true: %+v", r.exit)
	}
	r = h.exec(map[string]interface{}{"shell": "kill -TERM $$"})
	if r.exit.ExitCode != 128+15 || r.exit.Signal != "SIGTERM" {
		t.Fatalf("signal: %+v", r.exit)
	}
}

func TestExecShellEnvCwdStdin(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	if st := h.do("PUT", "/env", map[string]string{"BASE": "base", "OVER": "base"}, nil); st != 200 {
		t.Fatalf("put env: %d", st)
	}
	var env map[string]string
	if st := h.do("GET", "/env", nil, &env); st != 200 || env["BASE"] != "base" {
		t.Fatalf("get env: %d %v", st, env)
	}
	r := h.exec(map[string]interface{}{
		"shell": `echo "$BASE $OVER $REQ $TERM"; pwd; cat; test -n "$HOME" && test -n "$USER" && test -n "$PATH"`,
		"env":   map[string]string{"OVER": "req", "REQ": "r"},
		"cwd":   dir,
		"stdin": "from stdin\n",
	})
	want := "base req r xterm\n" + dir + "\nfrom stdin\n"
	if r.stdout != want || r.exit.ExitCode != 0 {
		t.Fatalf("got %q (exit %d), want %q; stderr %q", r.stdout, r.exit.ExitCode, want, r.stderr)
	}

	bin := []byte{0, 1, 2, 255, '\n', 0x80}
	r = h.exec(map[string]interface{}{"argv": []string{"cat"}, "stdinBase64": base64.StdEncoding.EncodeToString(bin)})
	if r.stdout != string(bin) {
		t.Fatalf("binary stdin: %q", r.stdout)
	}

	// Larger than one chunk and than a pipe buffer, on both streams.
	r = h.exec(map[string]interface{}{"shell": "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2"})
	if len(r.stdout) != 300000 || len(r.stderr) != 200000 {
		t.Fatalf("big output: %d/%d", len(r.stdout), len(r.stderr))
	}

	// A background child holding the pipes must not hold the answer.
	start := time.Now()
	r = h.exec(map[string]interface{}{"shell": "sleep 5 & echo bg"})
	if r.stdout != "bg\n" || time.Since(start) > 3*time.Second {
		t.Fatalf("background child: %q after %v", r.stdout, time.Since(start))
	}
}

func TestExecTimeout(t *testing.T) {
	h := newHarness(t)
	start := time.Now()
	r := h.exec(map[string]interface{}{"shell": "echo before; sleep 30", "timeoutMs": 300})
	if !r.exit.TimedOut || r.exit.ExitCode != 137 || r.exit.Signal != "SIGKILL" || r.stdout != "before\n" {
		t.Fatalf("timeout: %+v stdout %q", r.exit, r.stdout)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("timeout took %v", d)
	}
}

func TestExecStartErrors(t *testing.T) {
	h := newHarness(t)
	for _, tc := range []struct {
		body       map[string]interface{}
		code, text string
	}{
		{map[string]interface{}{"argv": []string{"nosuchcmd"}}, "CommandNotFound", `command not found: "nosuchcmd"`},
		{map[string]interface{}{"argv": []string{"/no/such/bin"}}, "CommandNotFound", "command not found"},
		{map[string]interface{}{"argv": []string{"nosuchcmd"}, "env": map[string]string{"PATH": "/nonexistent"}}, "CommandNotFound", "nosuchcmd"},
		// PATH of the target env decides: no sh on this PATH.
		{map[string]interface{}{"argv": []string{"sh"}, "env": map[string]string{"PATH": "/nonexistent"}}, "CommandNotFound", `"sh"`},
		{map[string]interface{}{"argv": []string{"/etc/passwd"}}, "BadRequest", "cannot execute"},
		{map[string]interface{}{"argv": []string{"true"}, "cwd": "/no/such/dir"}, "BadRequest", "cwd"},
		{map[string]interface{}{"argv": []string{"true"}, "user": "no-such-user-xyz"}, "BadRequest", "unknown user"},
		{map[string]interface{}{"argv": []string{"true"}, "shell": "true"}, "BadRequest", "exactly one"},
		{map[string]interface{}{}, "BadRequest", "required"},
	} {
		var e apiError
		st := h.do("POST", "/exec", tc.body, &e)
		if st != 400 || e.Error.Code != tc.code || !strings.Contains(e.Error.Message, tc.text) {
			t.Errorf("%v: %d %+v", tc.body, st, e)
		}
	}
}

func TestExecKillAndDisconnect(t *testing.T) {
	h := newHarness(t)

	// Kill through the API. The start and the output of a running exec reach
	// the client while it runs (buffered for at most process.FlushDelay).
	j, _ := json.Marshal(map[string]interface{}{"shell": "echo first; sleep 30"})
	resp := h.req("POST", "/exec", bytes.NewReader(j), testToken)
	dec := json.NewDecoder(resp.Body)
	var started, first event
	if err := dec.Decode(&started); err != nil || started.Type != "started" {
		t.Fatalf("started: %+v %v", started, err)
	}
	if err := dec.Decode(&first); err != nil || first.Type != "stdout" || string(first.Data) != "first\n" {
		t.Fatalf("first output: %+v %v", first, err)
	}
	if st := h.do("POST", "/exec/"+itoa(started.Pid)+"/kill", map[string]string{"signal": "SIGTERM"}, nil); st != 200 {
		t.Fatalf("kill: %d", st)
	}
	var exit event
	for exit.Type != "exit" {
		if err := dec.Decode(&exit); err != nil {
			t.Fatal(err)
		}
	}
	resp.Body.Close()
	if exit.ExitCode != 143 || exit.Signal != "SIGTERM" || exit.TimedOut {
		t.Fatalf("killed exit: %+v", exit)
	}
	var e apiError
	if st := h.do("POST", "/exec/"+itoa(started.Pid)+"/kill", nil, &e); st != 404 || e.Error.Code != "NotFound" {
		t.Fatalf("kill after exit: %d %+v", st, e)
	}

	// A client that goes away takes its process group with it.
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", h.http.URL+"/exec", strings.NewReader(`{"shell":"sleep 30 & sleep 30"}`))
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := h.http.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.NewDecoder(resp.Body).Decode(&started); err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()
	waitUntil(t, 5*time.Second, "the disconnected exec's group to die", func() bool {
		return syscall.Kill(-started.Pid, 0) == syscall.ESRCH
	})
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestRestoreSwapsToken(t *testing.T) {
	h := newHarness(t)
	mid := filepath.Join(t.TempDir(), "machine-id")
	if err := os.WriteFile(mid, []byte("00000000000000000000000000000000\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	h.srv.restore = h.fake.system(mid)

	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	var e apiError
	// Too little entropy: rejected, nothing changed.
	short := map[string]interface{}{"token": "new", "entropy": base64.StdEncoding.EncodeToString(seed[:16])}
	if st := h.do("POST", "/restore", short, &e); st != 400 || e.Error.Code != "BadRequest" {
		t.Fatalf("short entropy: %d %+v", st, e)
	}

	body := map[string]interface{}{
		"token": "new-secret", "entropy": base64.StdEncoding.EncodeToString(seed),
		"unixTimeNs": int64(1700000000123456789), "hostname": "clone-1",
	}
	var ok map[string]bool
	if st := h.do("POST", "/restore", body, &ok); st != 200 || !ok["ok"] {
		t.Fatalf("restore: %d %v", st, ok)
	}
	if !bytes.Equal(h.fake.entropy, seed) || h.fake.timeNs != 1700000000123456789 || h.fake.hostname != "clone-1" {
		t.Fatalf("restore steps: %+v", h.fake)
	}
	b, _ := os.ReadFile(mid)
	if id := strings.TrimSpace(string(b)); len(id) != 32 || id == strings.Repeat("0", 32) {
		t.Fatalf("machine-id %q", b)
	} else if _, err := hex.DecodeString(id); err != nil {
		t.Fatalf("machine-id %q", b)
	}

	if resp := h.req("GET", "/env", nil, testToken); resp.StatusCode != 401 {
		t.Fatalf("old token after restore: %d", resp.StatusCode)
	}
	if resp := h.req("GET", "/env", nil, "new-secret"); resp.StatusCode != 200 {
		t.Fatalf("new token after restore: %d", resp.StatusCode)
	}

	// unixTimeNs 0 leaves the clock alone.
	h.fake.timeNs = -1
	body["unixTimeNs"] = 0
	j, _ := json.Marshal(body)
	if resp := h.req("POST", "/restore", bytes.NewReader(j), "new-secret"); resp.StatusCode != 200 || h.fake.timeNs != -1 {
		t.Fatalf("restore without time: %d, clock set to %d", resp.StatusCode, h.fake.timeNs)
	}
}

func TestRealEntropy(t *testing.T) {
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	if err := restore.AddEntropy(seed); err != nil {
		if err == syscall.EPERM || os.IsPermission(err) || os.IsNotExist(err) {
			t.Skipf("RNDADDENTROPY not permitted here: %v", err)
		}
		t.Fatal(err)
	}
}

func TestSyncAndStats(t *testing.T) {
	h := newHarness(t)
	var ok map[string]bool
	if st := h.do("POST", "/sync", nil, &ok); st != 200 || !ok["ok"] {
		t.Fatalf("sync: %d", st)
	}
	var s map[string]float64
	if st := h.do("GET", "/stats", nil, &s); st != 200 {
		t.Fatalf("stats: %d", st)
	}
	for _, k := range []string{"memTotalBytes", "memAvailableBytes", "cpuTotalTicks", "cpuIdleTicks",
		"diskTotalBytes", "diskUsedBytes", "netRxBytes", "netTxBytes", "loadAvg1"} {
		if _, ok := s[k]; !ok {
			t.Errorf("stats lacks %s", k)
		}
	}
	if s["memTotalBytes"] <= 0 || s["diskTotalBytes"] <= 0 || s["cpuTotalTicks"] <= 0 {
		t.Errorf("stats: %v", s)
	}
}

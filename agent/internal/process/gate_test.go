package process

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"cocoon/agent/internal/apierr"
)

// With a workload set, children go through the gate: placed (here, a plain
// file stands in for cgroup.procs) before they run, with their own pid, output
// and exit code, and a failed exec still reported before any stream.
func TestGate(t *testing.T) {
	dir := t.TempDir()
	procs := filepath.Join(dir, "cgroup.procs")
	if err := os.WriteFile(procs, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	SetWorkload(dir)
	defer SetWorkload("")
	m := NewManager(DefaultReaper())

	p, err := Prepare(Spec{Argv: []string{"sh", "-c", "echo $$; cat; exit 3"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	e, err := m.StartExec(p, []byte("in"))
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	res := e.Run(context.Background(), 10*time.Second, func(stream string, data []byte) error {
		out.Write(data)
		return nil
	})
	pid := strconv.Itoa(e.Pid)
	if res.ExitCode != 3 || out.String() != pid+"\nin" {
		t.Fatalf("exit %d, output %q (pid %s)", res.ExitCode, out.String(), pid)
	}
	if placed, _ := os.ReadFile(procs); string(placed) != pid {
		t.Fatalf("placed %q, want %s", placed, pid)
	}

	// Executable by its mode, but not a program: the exec fails in the gate.
	bogus := filepath.Join(dir, "bogus")
	if err := os.WriteFile(bogus, []byte{0, 1, 2, 3}, 0o755); err != nil {
		t.Fatal(err)
	}
	p, err = Prepare(Spec{Argv: []string{bogus}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.StartExec(p, nil); apierr.From(err).Code != apierr.CodeBadRequest || !strings.Contains(err.Error(), "exec format error") {
		t.Fatalf("bogus program: %v", err)
	}

	// A cgroup that cannot take the process: refused, nothing left running.
	SetWorkload(filepath.Join(dir, "missing"))
	if _, err := m.StartExec(p, nil); apierr.From(err).Code != apierr.CodeInternal || !strings.Contains(err.Error(), "cannot place") {
		t.Fatalf("missing cgroup: %v", err)
	}
}

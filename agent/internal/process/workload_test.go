package process

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"cocoon/agent/internal/apierr"
)

// cgroup2Mount is where a cgroup v2 hierarchy is mounted on this machine ("" if none).
func cgroup2Mount(t *testing.T) string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) > 2 && fields[2] == "cgroup2" {
			return fields[1]
		}
	}
	return ""
}

// With a workload set, children are created inside it (the kernel lists them
// in its cgroup.procs from their first instruction), with their own pid,
// output and exit code, and a failed exec is still reported before any stream.
func TestWorkloadCgroup(t *testing.T) {
	mount := cgroup2Mount(t)
	if mount == "" || os.Geteuid() != 0 {
		t.Skip("needs root and a cgroup v2 hierarchy")
	}
	dir := filepath.Join(mount, "cocoon-agent-test-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("cannot make a cgroup: %v", err)
	}
	defer os.Remove(dir)
	if err := SetWorkload(dir); err != nil {
		t.Fatal(err)
	}
	defer SetWorkload("")
	m := NewManager(DefaultReaper())

	p, err := Prepare(Spec{Argv: []string{"sh", "-c", "echo $$; cat /proc/self/cgroup | grep '^0::'; cat; exit 3"}}, nil)
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
	want := strconv.Itoa(e.Pid) + "\n0::/" + filepath.Base(dir) + "\nin"
	if res.ExitCode != 3 || out.String() != want {
		t.Fatalf("exit %d, output %q, want %q", res.ExitCode, out.String(), want)
	}

	// Executable by its mode, but not a program: the exec fails and says why.
	bogus := filepath.Join(t.TempDir(), "bogus")
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

	// A workload that is not a cgroup (an empty directory): refused, nothing started.
	if err := SetWorkload(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	p, err = Prepare(Spec{Argv: []string{"true"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.StartExec(p, nil); apierr.From(err).Code != apierr.CodeInternal {
		t.Fatalf("not a cgroup: %v", err)
	}
	// A missing directory is refused when it is set.
	if err := SetWorkload(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("a missing workload cgroup was accepted")
	}
}

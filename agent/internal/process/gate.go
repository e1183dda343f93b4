package process

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
)

// Every process the agent starts runs in the workload cgroup set up at boot
// (pids and CPU limits that keep PID 1 alive and responsive whatever the
// guest runs). A child must be in the cgroup before it runs any code of its
// own, or it could fork outside it, and Go 1.19's ForkExec cannot place a
// child (there is no CLONE_INTO_CGROUP). So each child starts as a gate: the
// agent re-executed through /proc/self/exe, which waits on a pipe while the
// agent moves it into the cgroup, then executes the real program and, as
// ForkExec itself does, reports a failed exec on a close-on-exec pipe.
//
// The gate forks in the agent's cgroup and execs at once, so ForkExec (which
// holds a runtime P until the child execs) never waits on a child starved
// by the workload it joins.

var workload atomic.Value // string: the cgroup directory; "" = no gate

// SetWorkload makes every process started from now on run in the cgroup v2
// directory dir ("" starts them directly, where the agent is).
func SetWorkload(dir string) { workload.Store(dir) }

const (
	gateArg0 = "cocoon-agent-gate"
	// The gate's descriptors follow the standard three of every child.
	gateFd   = 3 // read end: one byte once the gate is in the cgroup
	reportFd = 4 // write end, close-on-exec: the errno of a failed exec
	// gateRefused is the gate's exit code when the agent let it go unplaced.
	gateRefused = 126
)

func init() {
	if len(os.Args) >= 3 && os.Args[0] == gateArg0 && os.Getpid() != 1 {
		runGate(os.Args[1], os.Args[2:])
	}
}

// runGate never returns.
func runGate(path string, argv []string) {
	var b [1]byte
	n, err := 0, error(syscall.EINTR)
	for err == syscall.EINTR {
		n, err = syscall.Read(gateFd, b[:])
	}
	if n != 1 {
		os.Exit(gateRefused)
	}
	syscall.Close(gateFd)
	syscall.CloseOnExec(reportFd)
	err = syscall.Exec(path, argv, os.Environ())
	errno, ok := err.(syscall.Errno)
	if !ok {
		errno = syscall.EINVAL
	}
	var report [4]byte
	binary.LittleEndian.PutUint32(report[:], uint32(errno))
	_, _ = syscall.Write(reportFd, report[:])
	os.Exit(127)
}

// forkExec starts p with attr (whose Files are the child's fds 0-2) through
// r, inside the workload cgroup if one is set. Errors are ForkExec's, for
// startError.
func forkExec(r *Reaper, p *Prepared, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	dir, _ := workload.Load().(string)
	if dir == "" {
		return r.Start(func() (int, error) {
			return syscall.ForkExec(p.Path, p.Argv, attr)
		})
	}
	if len(attr.Files) != gateFd {
		return 0, nil, fmt.Errorf("a gated child takes exactly %d descriptors", gateFd)
	}
	gateR, gateW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer gateW.Close()
	reportR, reportW, err := os.Pipe()
	if err != nil {
		gateR.Close()
		return 0, nil, err
	}
	defer reportR.Close()
	gated := *attr
	gated.Files = []uintptr{attr.Files[0], attr.Files[1], attr.Files[2], gateR.Fd(), reportW.Fd()}
	argv := append([]string{gateArg0, p.Path}, p.Argv...)
	pid, exit, err := r.Start(func() (int, error) {
		pid, err := syscall.ForkExec("/proc/self/exe", argv, &gated)
		if err != nil {
			return 0, err
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			// Never registered: the reaper collects it as an orphan.
			_ = syscall.Kill(pid, syscall.SIGKILL)
			return 0, fmt.Errorf("cannot place the process in %s: %w", dir, err)
		}
		return pid, nil
	})
	// Only the child may hold these ends: EOF on the report means it exec'd.
	gateR.Close()
	reportW.Close()
	if err != nil {
		return 0, nil, err
	}
	if _, err := gateW.Write([]byte{1}); err != nil {
		return 0, nil, err
	}
	var report [4]byte
	if n, _ := io.ReadFull(reportR, report[:]); n == len(report) {
		// The gate exits; its status goes to the buffered channel, unread.
		return 0, nil, syscall.Errno(binary.LittleEndian.Uint32(report[:]))
	}
	return pid, exit, nil
}

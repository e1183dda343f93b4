package process

import (
	"fmt"
	"sync/atomic"
	"syscall"
)

// Every process the agent starts runs in the workload cgroup set up at boot
// (pids and CPU limits that keep PID 1 alive and responsive whatever the
// guest runs). A child must be in the cgroup before it runs any code of its
// own, or it could fork outside it: clone3's CLONE_INTO_CGROUP
// (SysProcAttr.CgroupFD, Go >= 1.20, Linux >= 5.7) creates it there, so it
// is never anywhere else. (Go 1.19 could not, and each child went through a
// re-executed copy of the agent that waited to be moved: ~14 ms an exec
// under TCG.)

// workloadFd is a descriptor of the cgroup v2 directory, -1 for none.
var workloadFd atomic.Int64

func init() { workloadFd.Store(-1) }

// SetWorkload makes every process started from now on run in the cgroup v2
// directory dir ("" starts them directly, where the agent is). The directory
// stays open for the agent's life; the one it replaces is closed.
func SetWorkload(dir string) error {
	fd := -1
	if dir != "" {
		var err error
		if fd, err = syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0); err != nil {
			return fmt.Errorf("workload cgroup %s: %w", dir, err)
		}
	}
	if old := workloadFd.Swap(int64(fd)); old >= 0 {
		syscall.Close(int(old))
	}
	return nil
}

// forkExec starts p with attr through r, inside the workload cgroup if one
// is set. Errors are ForkExec's, for startError; a cgroup that cannot take
// the process (pids.max reached) fails the clone itself.
func forkExec(r *Reaper, p *Prepared, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	if fd := workloadFd.Load(); fd >= 0 {
		sys := *attr.Sys
		sys.UseCgroupFD, sys.CgroupFD = true, int(fd)
		placed := *attr
		placed.Sys = &sys
		attr = &placed
	}
	return r.Start(func() (int, error) {
		return syscall.ForkExec(p.Path, p.Argv, attr)
	})
}

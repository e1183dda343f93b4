package process

import (
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// Reaper is the single owner of wait4 in the agent. As PID 1 every orphan in
// the guest is re-parented to us and must be reaped, but a blanket
// wait4(-1) would also swallow the exit statuses of our own exec, app and
// terminal children. So all children are started through Start, which
// registers a waiter for the pid, and the reap loop hands each status it
// collects to the waiter registered for that pid; statuses of unknown pids
// (orphans) are just dropped.
//
// Nothing else in the process may call wait4/Wait on children (no
// exec.Cmd.Wait, no os.Process.Wait), or statuses would be stolen from it.
type Reaper struct {
	// mu is held around fork+register in Start and around wait4+lookup in
	// the reap loop. Holding it across both halves on each side means a
	// child that exits before its waiter is registered cannot be reaped
	// until the registration is visible, and a pid cannot be recycled
	// between being reaped and being looked up.
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
}

var (
	defaultOnce   sync.Once
	defaultReaper *Reaper
)

// DefaultReaper returns the process-wide reaper, starting its loop on first
// use. There is exactly one because SIGCHLD and wait4(-1) are process-wide.
func DefaultReaper() *Reaper {
	defaultOnce.Do(func() {
		defaultReaper = &Reaper{waiters: make(map[int]chan syscall.WaitStatus)}
		go defaultReaper.loop()
	})
	return defaultReaper
}

// Start runs start (which must fork exactly one child and return its pid)
// with the reaper's lock held, and returns a channel that receives the
// child's wait status once.
func (r *Reaper) Start(start func() (int, error)) (int, <-chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := start()
	if err != nil {
		return 0, nil, err
	}
	// Buffered so the reap loop never blocks on a waiter that is gone.
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}

func (r *Reaper) loop() {
	defer recoverLog("reaper")
	// Signals coalesce, so one SIGCHLD may stand for many exits: each wake
	// drains wait4 until nothing is left. Notify is in effect before the
	// first drain, so no exit is missed, and an idle guest is never woken.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGCHLD)
	for {
		r.reapAll()
		<-sig
	}
}

func (r *Reaper) reapAll() {
	for {
		r.mu.Lock()
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			r.mu.Unlock()
			continue
		}
		if err != nil || pid <= 0 {
			r.mu.Unlock()
			return
		}
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- ws
		}
		r.mu.Unlock()
	}
}

// SetSubreaper makes this process the reaper of its orphaned descendants
// (PR_SET_CHILD_SUBREAPER), which PID 1 is anyway. Off PID 1 it makes the
// agent clean up after the processes it started just as it would in a guest.
func SetSubreaper() error {
	const prSetChildSubreaper = 36
	if _, _, e := syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0); e != 0 {
		return e
	}
	return nil
}

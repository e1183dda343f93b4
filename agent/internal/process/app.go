package process

import (
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
)

// Restart policies of POST /app.
const (
	RestartNo        = "no"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// AppSpec is a Spec plus its restart policy ("" = on-failure) and the
// signal that asks it to stop (0 = SIGTERM; an image's STOPSIGNAL).
type AppSpec struct {
	Spec
	Restart    string
	StopSignal syscall.Signal
}

// AppStatus is GET /app.
type AppStatus struct {
	State     string  `json:"state"` // running | exited | none
	Pid       int     `json:"pid"`
	Restarts  int     `json:"restarts"`
	ExitCode  *int    `json:"exitCode"`
	StartedAt *string `json:"startedAt"` // RFC 3339; null when never started
}

// Supervisor runs at most one app, restarting it per its policy with
// exponential backoff, its output going to Logs.
type Supervisor struct {
	M          *Manager
	Base       *BaseEnv
	Logs       *Ring
	BackoffMin time.Duration
	BackoffMax time.Duration
	StopGrace  time.Duration // SIGTERM → SIGKILL
	// A run that stayed up this long was not a crash loop: backoff resets.
	StableAfter time.Duration

	ops sync.Mutex // serializes Start/Stop, so a replacement waits for its predecessor to be gone
	mu  sync.Mutex // protects cur and the status fields of every appRun
	cur *appRun
}

type appRun struct {
	spec AppSpec
	stop chan struct{} // closed (under Supervisor.mu) when the run must end
	done chan struct{} // closed when its supervise loop has returned

	// Protected by Supervisor.mu.
	pid       int // 0 while not running
	restarts  int
	exitCode  *int
	startedAt time.Time
}

func NewSupervisor(m *Manager, base *BaseEnv) *Supervisor {
	return &Supervisor{
		M: m, Base: base, Logs: NewRing(1 << 20),
		BackoffMin: time.Second, BackoffMax: 30 * time.Second,
		StopGrace: 5 * time.Second, StableAfter: 10 * time.Second,
	}
}

// Start replaces the current app (if any) with spec.
func (s *Supervisor) Start(spec AppSpec) (AppStatus, error) {
	switch spec.Restart {
	case "":
		spec.Restart = RestartOnFailure
	case RestartNo, RestartOnFailure, RestartAlways:
	default:
		return AppStatus{}, apierr.BadRequest(fmt.Sprintf("invalid restart policy %q", spec.Restart))
	}
	prep, err := Prepare(spec.Spec, s.Base.Get())
	if err != nil {
		return AppStatus{}, err
	}
	s.ops.Lock()
	defer s.ops.Unlock()
	s.stopCurrent()

	run := &appRun{spec: spec, stop: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	exit, err := s.launch(run, prep)
	if err != nil {
		s.cur = nil
		s.mu.Unlock()
		return AppStatus{}, err
	}
	s.cur = run
	s.mu.Unlock()
	go s.supervise(run, exit)
	return s.Status(), nil
}

// Stop ends the app: its stop signal (SIGTERM by default) to its group, SIGKILL after StopGrace.
func (s *Supervisor) Stop() {
	s.ops.Lock()
	defer s.ops.Unlock()
	s.stopCurrent()
}

// stopCurrent needs s.ops held.
func (s *Supervisor) stopCurrent() {
	s.mu.Lock()
	run := s.cur
	s.cur = nil
	if run == nil {
		s.mu.Unlock()
		return
	}
	// Under s.mu, so supervise either sees stop before relaunching or has
	// already published the new pid we are about to signal.
	close(run.stop)
	pid := run.pid
	s.mu.Unlock()
	stop := run.spec.StopSignal
	if stop == 0 {
		stop = syscall.SIGTERM
	}
	if pid > 0 {
		_ = syscall.Kill(-pid, stop)
		_ = syscall.Kill(-pid, syscall.SIGCONT)
	}
	select {
	case <-run.done:
	case <-time.After(s.StopGrace):
		s.mu.Lock()
		pid = run.pid
		s.mu.Unlock()
		if pid > 0 {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
		}
		<-run.done
	}
}

func (s *Supervisor) Status() AppStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	run := s.cur
	if run == nil {
		return AppStatus{State: "none"}
	}
	st := AppStatus{State: "exited", Pid: run.pid, Restarts: run.restarts, ExitCode: run.exitCode}
	if run.pid > 0 {
		st.State = "running"
	}
	if !run.startedAt.IsZero() {
		ts := run.startedAt.UTC().Format(time.RFC3339Nano)
		st.StartedAt = &ts
	}
	return st
}

// launch forks one incarnation of run; s.mu must be held.
func (s *Supervisor) launch(run *appRun, p *Prepared) (<-chan syscall.WaitStatus, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, apierr.Internal(err.Error())
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		r.Close()
		w.Close()
		return nil, apierr.Internal(err.Error())
	}
	attr := &syscall.ProcAttr{
		Dir:   p.Dir,
		Env:   p.Env,
		Files: []uintptr{null.Fd(), w.Fd(), w.Fd()},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Credential: p.Cred},
	}
	pid, exit, err := forkExec(s.M.Reaper, p, attr)
	null.Close()
	w.Close()
	if err != nil {
		r.Close()
		return nil, startError(p, err)
	}
	run.pid = pid
	run.startedAt = time.Now()
	go func() {
		defer recoverLog("app output")
		defer r.Close()
		buf := make([]byte, chunkSize)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				_, _ = s.Logs.Write(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}()
	return exit, nil
}

func (s *Supervisor) supervise(run *appRun, exit <-chan syscall.WaitStatus) {
	defer close(run.done)
	defer recoverLog("app supervisor")
	backoff := s.BackoffMin
	for {
		info := Exit(<-exit)
		s.mu.Lock()
		ran := time.Since(run.startedAt)
		run.pid = 0
		code := info.Code
		run.exitCode = &code
		s.mu.Unlock()

		if !shouldRestart(run.spec.Restart, code) {
			return
		}
		if ran >= s.StableAfter {
			backoff = s.BackoffMin
		}
		for exit = nil; exit == nil; {
			select {
			case <-run.stop:
				return
			case <-time.After(backoff):
			}
			if backoff *= 2; backoff > s.BackoffMax {
				backoff = s.BackoffMax
			}
			// Re-prepared each time so a PUT /env reaches the next incarnation.
			prep, err := Prepare(run.spec.Spec, s.Base.Get())
			s.mu.Lock()
			select {
			case <-run.stop:
				s.mu.Unlock()
				return
			default:
			}
			if err == nil {
				exit, err = s.launch(run, prep)
			}
			run.restarts++
			s.mu.Unlock()
			if err != nil {
				fmt.Fprintf(s.Logs, "cocoon-agent: app restart failed: %v\n", err)
			}
		}
	}
}

func shouldRestart(policy string, code int) bool {
	switch policy {
	case RestartAlways:
		return true
	case RestartOnFailure:
		return code != 0
	}
	return false
}

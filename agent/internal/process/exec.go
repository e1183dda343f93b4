package process

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
)

// chunkSize bounds one stdout/stderr event (before base64).
const chunkSize = 32 << 10

// drainGrace is how long output is still collected after the process exits.
// A background grandchild may hold the pipes open forever; data already in
// the pipe is read well within it.
const drainGrace = 500 * time.Millisecond

// Manager starts processes through one Reaper and keeps the running execs by
// pid for POST /exec/{pid}/kill.
type Manager struct {
	Reaper *Reaper

	mu    sync.Mutex // protects execs
	execs map[int]*Exec
}

func NewManager(r *Reaper) *Manager {
	return &Manager{Reaper: r, execs: make(map[int]*Exec)}
}

// Exec is a started one-shot process whose group id equals its pid.
type Exec struct {
	Pid     int
	m       *Manager
	started time.Time
	exit    <-chan syscall.WaitStatus
	stdout  *os.File
	stderr  *os.File
	stdin   *os.File // parent's write end; nil when stdin is /dev/null
	input   []byte
}

// Result is the final event of an exec.
type Result struct {
	ExitCode   int
	Signal     string
	TimedOut   bool
	DurationMs int64
}

// StartExec forks p with its own process group, stdout and stderr on pipes
// and stdin fed from input (nil means /dev/null).
func (m *Manager) StartExec(p *Prepared, input []byte) (*Exec, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, apierr.Internal(err.Error())
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, apierr.Internal(err.Error())
	}
	var inR, inW *os.File
	if input != nil {
		inR, inW, err = os.Pipe()
	} else {
		inR, err = os.Open(os.DevNull)
	}
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return nil, apierr.Internal(err.Error())
	}
	// The child's ends are closed in the parent right after the fork so that
	// EOF on the read ends means every writer is gone.
	childEnds := []*os.File{inR, outW, errW}
	attr := &syscall.ProcAttr{
		Dir:   p.Dir,
		Env:   p.Env,
		Files: []uintptr{inR.Fd(), outW.Fd(), errW.Fd()},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Credential: p.Cred},
	}
	e := &Exec{m: m, stdout: outR, stderr: errR, stdin: inW, input: input}
	pid, exit, err := forkExec(m.Reaper, p, attr)
	for _, f := range childEnds {
		f.Close()
	}
	if err != nil {
		outR.Close()
		errR.Close()
		if inW != nil {
			inW.Close()
		}
		return nil, startError(p, err)
	}
	e.Pid, e.exit, e.started = pid, exit, time.Now()
	m.mu.Lock()
	m.execs[pid] = e
	m.mu.Unlock()
	return e, nil
}

// Kill signals the process group of a running exec.
func (m *Manager) Kill(pid int, sig syscall.Signal) error {
	m.mu.Lock()
	_, ok := m.execs[pid]
	m.mu.Unlock()
	if !ok {
		return apierr.NotFound(fmt.Sprintf("no running exec with pid %d", pid))
	}
	if err := syscall.Kill(-pid, sig); err != nil && err != syscall.ESRCH {
		return apierr.Internal(err.Error())
	}
	return nil
}

type chunk struct {
	stream string
	data   []byte
}

// Run streams output to emit (called from this goroutine only, in order)
// until the process has exited and its output is drained. The group is
// SIGKILLed on timeout (0 = none), when ctx ends (client gone) or when emit
// fails; output is then no longer emitted but the exit is still awaited.
func (e *Exec) Run(ctx context.Context, timeout time.Duration, emit func(stream string, data []byte) error) Result {
	defer recoverLog("exec")
	chunks := make(chan chunk)
	var readers sync.WaitGroup
	readers.Add(2)
	go e.read("stdout", e.stdout, chunks, &readers)
	go e.read("stderr", e.stderr, chunks, &readers)
	readersDone := make(chan struct{})
	go func() { readers.Wait(); close(readersDone) }()

	if e.stdin != nil {
		go func() {
			// EPIPE when the child never reads its stdin is expected.
			_, _ = e.stdin.Write(e.input)
			e.stdin.Close()
		}()
	}

	var timer <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timer = t.C
	}

	var res Result
	exited, drained, killed, emitting := false, false, false, true
	done := ctx.Done()
	kill := func() {
		if !killed {
			killed = true
			_ = syscall.Kill(-e.Pid, syscall.SIGKILL)
		}
	}
	for !exited || !drained {
		select {
		case c := <-chunks:
			if emitting {
				if err := emit(c.stream, c.data); err != nil {
					emitting = false
					kill()
				}
			}
		case <-readersDone:
			drained, readersDone = true, nil
		case ws := <-e.exit:
			exited, e.exit = true, nil
			res.DurationMs = time.Since(e.started).Milliseconds()
			info := Exit(ws)
			res.ExitCode, res.Signal = info.Code, info.Signal
			e.m.mu.Lock()
			delete(e.m.execs, e.Pid)
			e.m.mu.Unlock()
			deadline := time.Now().Add(drainGrace)
			_ = e.stdout.SetReadDeadline(deadline)
			_ = e.stderr.SetReadDeadline(deadline)
			if e.stdin != nil {
				e.stdin.Close()
			}
			timer = nil
		case <-timer:
			timer = nil
			res.TimedOut = true
			kill()
		case <-done:
			done = nil
			emitting = false
			kill()
		}
	}
	e.stdout.Close()
	e.stderr.Close()
	return res
}

func (e *Exec) read(stream string, f *os.File, out chan<- chunk, wg *sync.WaitGroup) {
	defer wg.Done()
	buf := make([]byte, chunkSize)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			out <- chunk{stream, append([]byte(nil), buf[:n]...)}
		}
		if err != nil {
			// EOF, or the post-exit deadline: either way this stream is done.
			return
		}
	}
}

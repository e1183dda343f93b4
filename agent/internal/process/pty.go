package process

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"cocoon/agent/internal/apierr"
)

// PTY is a process running as session leader on a fresh pseudo-terminal.
type PTY struct {
	Pid    int
	Master *os.File
	Exit   <-chan syscall.WaitStatus
}

type winsize struct {
	Row, Col, Xpixel, Ypixel uint16
}

func ioctl(fd, req, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg); e != 0 {
		return e
	}
	return nil
}

// openPTY allocates a master/slave pair the way posix_openpt+grantpt+
// unlockpt+ptsname would, without cgo.
func openPTY() (master *os.File, slave *os.File, err error) {
	mfd, err := syscall.Open("/dev/ptmx", syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	unlock := int32(0)
	if err := ioctl(uintptr(mfd), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); err != nil {
		syscall.Close(mfd)
		return nil, nil, fmt.Errorf("TIOCSPTLCK: %w", err)
	}
	var n uint32
	if err := ioctl(uintptr(mfd), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); err != nil {
		syscall.Close(mfd)
		return nil, nil, fmt.Errorf("TIOCGPTN: %w", err)
	}
	name := fmt.Sprintf("/dev/pts/%d", n)
	sfd, err := syscall.Open(name, syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		syscall.Close(mfd)
		return nil, nil, fmt.Errorf("open %s: %w", name, err)
	}
	// Non-blocking before NewFile so the master goes through the runtime
	// poller: reads then honour deadlines and Close unblocks them.
	if err := syscall.SetNonblock(mfd, true); err != nil {
		syscall.Close(mfd)
		syscall.Close(sfd)
		return nil, nil, err
	}
	return os.NewFile(uintptr(mfd), "/dev/ptmx"), os.NewFile(uintptr(sfd), name), nil
}

// Resize sets the terminal size; the kernel sends SIGWINCH to the
// foreground group.
func Resize(f *os.File, cols, rows uint16) error {
	ws := winsize{Row: rows, Col: cols}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = ioctl(fd, syscall.TIOCSWINSZ, uintptr(unsafe.Pointer(&ws)))
	}); err != nil {
		return err
	}
	return ierr
}

// StartPTY runs p as a session leader whose controlling terminal is a new pty.
func (m *Manager) StartPTY(p *Prepared, cols, rows uint16) (*PTY, error) {
	master, slave, err := openPTY()
	if err != nil {
		return nil, apierr.Internal(err.Error())
	}
	if err := Resize(master, cols, rows); err != nil {
		master.Close()
		slave.Close()
		return nil, apierr.Internal("TIOCSWINSZ: " + err.Error())
	}
	if p.Cred != nil {
		// As login does: the user owns their terminal (mesg, write, sudo's
		// tty checks rely on it).
		_ = slave.Chown(int(p.Cred.Uid), -1)
	}
	attr := &syscall.ProcAttr{
		Dir:   p.Dir,
		Env:   p.Env,
		Files: []uintptr{slave.Fd(), slave.Fd(), slave.Fd()},
		// Ctty is a descriptor number in the child: 0 is the slave.
		Sys: &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: p.Cred},
	}
	pid, exit, err := forkExec(m.Reaper, p, attr)
	// Only the child may hold the slave: the master reads EIO once the last
	// slave descriptor closes, which is how we see the session end.
	slave.Close()
	if err != nil {
		master.Close()
		return nil, startError(p, err)
	}
	return &PTY{Pid: pid, Master: master, Exit: exit}, nil
}

// Hangup is what a terminal hangup does to the session: SIGHUP (and
// SIGCONT, so stopped jobs see it) to the session leader's group.
func (t *PTY) Hangup() {
	_ = syscall.Kill(-t.Pid, syscall.SIGHUP)
	_ = syscall.Kill(-t.Pid, syscall.SIGCONT)
}

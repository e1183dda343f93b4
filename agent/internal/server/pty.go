package server

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
	"cocoon/agent/internal/process"
)

// Frame types of the terminal protocol: 1 byte type, 4 bytes big-endian
// length, payload.
const (
	FrameData   = 0x00
	FrameResize = 0x01 // client→agent: cols u16, rows u16
	FrameExit   = 0x02 // agent→client: int32 exit code, then the agent closes
)

// maxFrame bounds a client frame so a bad length cannot exhaust memory.
const maxFrame = 1 << 20

// ptyDrain is how long terminal output is still forwarded after the shell
// exits (a background job may keep the terminal open forever).
const ptyDrain = 500 * time.Millisecond

// hangupGrace is how long a session whose client vanished gets after SIGHUP
// before its group is SIGKILLed.
const hangupGrace = 2 * time.Second

// AppendFrame encodes one frame.
func AppendFrame(dst []byte, typ byte, payload []byte) []byte {
	var h [5]byte
	h[0] = typ
	binary.BigEndian.PutUint32(h[1:], uint32(len(payload)))
	return append(append(dst, h[:]...), payload...)
}

// ReadFrame decodes one frame.
func ReadFrame(r io.Reader) (byte, []byte, error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("frame of %d bytes exceeds %d", n, maxFrame)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, nil, err
	}
	return h[0], p, nil
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func parseDim(s string, def uint16) (uint16, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, apierr.BadRequest(fmt.Sprintf("invalid terminal dimension %q", s))
	}
	return uint16(n), nil
}

func (s *Server) pty(w http.ResponseWriter, r *http.Request) {
	if !headerHasToken(r.Header, "Connection", "upgrade") || !headerHasToken(r.Header, "Upgrade", "cocoon-pty") {
		apierr.Write(w, apierr.BadRequest("expected Connection: Upgrade and Upgrade: cocoon-pty"))
		return
	}
	q := r.URL.Query()
	cols, err := parseDim(q.Get("cols"), 80)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	rows, err := parseDim(q.Get("rows"), 24)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	argv := []string{"/bin/sh", "-l"}
	if cmd := q.Get("cmd"); cmd != "" {
		argv = []string{"/bin/sh", "-c", cmd}
	} else if fi, err := os.Stat("/bin/bash"); err == nil && fi.Mode().IsRegular() {
		argv = []string{"/bin/bash", "-l"}
	}
	prep, err := process.Prepare(process.Spec{Argv: argv, Cwd: q.Get("cwd"), User: q.Get("user")}, s.base.Get())
	if err != nil {
		apierr.Write(w, err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		apierr.Write(w, apierr.Internal("connection cannot be upgraded"))
		return
	}
	// Started before the upgrade so start failures still get a JSON error.
	t, err := s.procs.StartPTY(prep, cols, rows)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		_ = syscall.Kill(-t.Pid, syscall.SIGKILL)
		<-t.Exit
		t.Master.Close()
		return
	}
	_, err = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: cocoon-pty\r\n\r\n")
	if err == nil {
		err = brw.Flush()
	}
	if err != nil {
		t.Hangup()
	}
	ptySession(conn, brw.Reader, t)
}

// ptySession relays frames until the shell exits (exit frame, then close)
// or the client goes away (hangup, then kill).
func ptySession(conn net.Conn, in *bufio.Reader, t *process.PTY) {
	// Frames are written whole under wmu, from the output pump and, last,
	// the exit frame.
	var wmu sync.Mutex
	send := func(typ byte, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		_, err := conn.Write(AppendFrame(nil, typ, p))
		return err
	}

	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		buf := make([]byte, 32<<10)
		for {
			n, err := t.Master.Read(buf)
			if n > 0 {
				// A failed send is not fatal here: draining goes on so the
				// shell never blocks on a full terminal, and the input side
				// notices the dead client.
				_ = send(FrameData, buf[:n])
			}
			if err != nil {
				// EIO once the last slave fd is closed, or the drain deadline.
				return
			}
		}
	}()

	clientGone := make(chan struct{})
	go func() {
		defer close(clientGone)
		for {
			typ, p, err := ReadFrame(in)
			if err != nil {
				return
			}
			switch typ {
			case FrameData:
				if _, err := t.Master.Write(p); err != nil {
					// The shell is gone; its exit is reported by the other side.
					return
				}
			case FrameResize:
				if len(p) >= 4 {
					_ = process.Resize(t.Master, binary.BigEndian.Uint16(p[0:]), binary.BigEndian.Uint16(p[2:]))
				}
			}
			// Unknown frame types are ignored for forward compatibility.
		}
	}()

	select {
	case ws := <-t.Exit:
		_ = t.Master.SetReadDeadline(time.Now().Add(ptyDrain))
		<-outDone
		var code [4]byte
		binary.BigEndian.PutUint32(code[:], uint32(int32(process.Exit(ws).Code)))
		_ = send(FrameExit, code[:])
	case <-clientGone:
		t.Hangup()
		select {
		case <-t.Exit:
		case <-time.After(hangupGrace):
			_ = syscall.Kill(-t.Pid, syscall.SIGKILL)
			<-t.Exit
		}
	}
	t.Master.Close()
	conn.Close()
}

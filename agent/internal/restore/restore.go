// Package restore makes a VM restored from a snapshot unique again: every
// clone of a snapshot wakes up with the same RNG state, the clock of the
// moment it was taken, and the template's hostname, machine-id and secret.
package restore

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

// RNDADDENTROPY is _IOW('R', 0x03, int[2]) and RNDRESEEDCRNG _IO('R', 0x07);
// the syscall package lacks them.
const (
	RNDADDENTROPY = 0x40085203
	RNDRESEEDCRNG = 0x5207
)

// MinEntropy is the least entropy /restore accepts, in bytes.
const MinEntropy = 32

// System is the set of host-mutating operations, injectable so tests do not
// step the host clock or rename the host.
type System struct {
	AddEntropy    func(seed []byte) error
	SetTime       func(unixNs int64) error
	SetHostname   func(name string) error
	MachineIDPath string
}

// Real operates on the running kernel.
func Real() *System {
	return &System{
		AddEntropy:    AddEntropy,
		SetTime:       SetTime,
		SetHostname:   SetHostname,
		MachineIDPath: "/etc/machine-id",
	}
}

// Request is the body of POST /restore.
type Request struct {
	Token      string `json:"token"`
	Entropy    []byte `json:"entropy"` // base64 in JSON
	UnixTimeNs int64  `json:"unixTimeNs"`
	Hostname   string `json:"hostname"`
	// KeepMachineID: the same machine running on (a resume), not a new clone of it.
	KeepMachineID bool `json:"keepMachineId"`
}

// Validate rejects a request before anything is changed.
func (r *Request) Validate() error {
	if r.Token == "" {
		return fmt.Errorf("token is required")
	}
	if len(r.Entropy) < MinEntropy {
		return fmt.Errorf("entropy must be at least %d bytes, got %d", MinEntropy, len(r.Entropy))
	}
	if r.UnixTimeNs < 0 {
		return fmt.Errorf("unixTimeNs must not be negative")
	}
	if len(r.Hostname) > 64 {
		return fmt.Errorf("hostname longer than 64 bytes")
	}
	return nil
}

// Apply reseeds, steps the clock (unless UnixTimeNs is 0), sets the
// hostname (unless empty) and rewrites machine-id (if present, unless
// KeepMachineID). The token swap is left to the caller, to be done only when
// Apply succeeded.
func (s *System) Apply(r *Request) error {
	if err := s.AddEntropy(r.Entropy); err != nil {
		return fmt.Errorf("reseed RNG: %w", err)
	}
	if r.UnixTimeNs != 0 {
		if err := s.SetTime(r.UnixTimeNs); err != nil {
			return fmt.Errorf("set clock: %w", err)
		}
	}
	if r.Hostname != "" {
		if err := s.SetHostname(r.Hostname); err != nil {
			return fmt.Errorf("set hostname: %w", err)
		}
	}
	if s.MachineIDPath != "" && !r.KeepMachineID {
		if err := RewriteMachineID(s.MachineIDPath); err != nil {
			return fmt.Errorf("machine-id: %w", err)
		}
	}
	return nil
}

// AddEntropy mixes seed into the kernel pool, credits it and reseeds the
// CRNG from it, so a restored clone's /dev/urandom diverges from its
// siblings' immediately. Crediting alone does not reseed a CRNG that is
// already initialized: it reseeds on its own schedule (every 60 s once up
// for two minutes), and until then the children of one fork read the same
// random stream.
func AddEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/random", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(seed)+3)
	binary.LittleEndian.PutUint32(buf[0:], uint32(len(seed)*8)) // credited bits
	binary.LittleEndian.PutUint32(buf[4:], uint32(len(seed)))
	copy(buf[8:], seed)
	// Little-endian matches amd64 and arm64, the only guests we build for.
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return e
	}
	// ENODATA: the CRNG is not initialized yet; it will be, from the pool that now holds the seed.
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), RNDRESEEDCRNG, 0); e != 0 && e != syscall.ENODATA {
		return e
	}
	return nil
}

// SetTime steps CLOCK_REALTIME.
func SetTime(unixNs int64) error {
	ts := syscall.NsecToTimespec(unixNs)
	if _, _, e := syscall.Syscall(syscall.SYS_CLOCK_SETTIME, 0 /* CLOCK_REALTIME */, uintptr(unsafe.Pointer(&ts)), 0); e != 0 {
		return e
	}
	return nil
}

func SetHostname(name string) error { return syscall.Sethostname([]byte(name)) }

// RewriteMachineID gives the clone its own /etc/machine-id, only where the
// image has one (its absence means the image does not want one). The new id
// overwrites the old in place (one write at offset 0, the file's mode and
// inode kept) rather than going through a temporary file and a rename: under
// TCG, every new clone's QEMU translates the filesystem's create and rename
// paths anew, and the in-place write took ~50 ms off a fork child's re-key
// (SPECIFICATION.md). A torn write is no concern: the file is rewritten by
// every restore, and a clone that dies mid-write is gone.
func RewriteMachineID(path string) error {
	// O_NONBLOCK: a FIFO put there by the image fails at once instead of hanging the restore.
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	// Version 4 / variant bits as systemd-id128 would generate.
	id[6] = id[6]&0x0f | 0x40
	id[8] = id[8]&0x3f | 0x80
	line := []byte(hex.EncodeToString(id) + "\n")
	if _, err := f.WriteAt(line, 0); err != nil {
		return err
	}
	// Only an image's longer file has anything left past the id.
	if fi.Size() > int64(len(line)) {
		return f.Truncate(int64(len(line)))
	}
	return nil
}

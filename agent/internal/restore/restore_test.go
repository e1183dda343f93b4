package restore

import (
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
)

func TestValidate(t *testing.T) {
	ok := Request{Token: "t", Entropy: make([]byte, 32)}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Request{
		{Entropy: make([]byte, 32)},
		{Token: "t", Entropy: make([]byte, 31)},
		{Token: "t", Entropy: make([]byte, 32), UnixTimeNs: -1},
	} {
		if bad.Validate() == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

func TestRewriteMachineID(t *testing.T) {
	dir := t.TempDir()
	if err := RewriteMachineID(filepath.Join(dir, "absent")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "absent")); !os.IsNotExist(err) {
		t.Fatal("created a machine-id that did not exist")
	}
	// Shorter than an id, an id, and longer (an image's own): each ends as one new id, in place.
	for _, before := range []string{"x\n", "0123456789abcdef0123456789abcdef\n", "0123456789abcdef0123456789abcdef\ntrailing junk\n"} {
		p := filepath.Join(dir, "machine-id")
		os.Remove(p)
		os.WriteFile(p, []byte(before), 0o444)
		was, _ := os.Stat(p)
		if err := RewriteMachineID(p); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		fi, _ := os.Stat(p)
		if !regexp.MustCompile(`^[0-9a-f]{32}\n$`).Match(b) || string(b) == before || fi.Mode().Perm() != 0o444 || !os.SameFile(was, fi) {
			t.Fatalf("from %q: %q %v (same inode: %v)", before, b, fi.Mode(), os.SameFile(was, fi))
		}
	}
}

func TestRewriteMachineIDRefusesAFIFOWithoutHanging(t *testing.T) {
	p := filepath.Join(t.TempDir(), "machine-id")
	if err := syscall.Mkfifo(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := RewriteMachineID(p); err == nil {
		t.Fatal("wrote a machine-id into a FIFO")
	}
}

func TestApplyKeepsMachineIDOfTheSameMachine(t *testing.T) {
	p := filepath.Join(t.TempDir(), "machine-id")
	os.WriteFile(p, []byte("0123456789abcdef0123456789abcdef\n"), 0o444)
	sys := &System{AddEntropy: func([]byte) error { return nil }, SetTime: func(int64) error { return nil }, SetHostname: func(string) error { return nil }, MachineIDPath: p}
	if err := sys.Apply(&Request{Token: "t", Entropy: make([]byte, 32), KeepMachineID: true}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "0123456789abcdef0123456789abcdef\n" {
		t.Fatalf("a resume rewrote machine-id: %q", b)
	}
	if err := sys.Apply(&Request{Token: "t", Entropy: make([]byte, 32)}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) == "0123456789abcdef0123456789abcdef\n" || len(b) != 33 {
		t.Fatalf("a clone kept machine-id: %q", b)
	}
}

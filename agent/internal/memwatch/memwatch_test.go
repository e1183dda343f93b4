package memwatch

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestThrashing(t *testing.T) {
	t0 := time.Unix(1000, 0)
	old := sample{At: t0, FullStall: 5 * time.Second, LimitHits: 100}
	at := func(d time.Duration, stall time.Duration, hits uint64) sample {
		return sample{At: t0.Add(d), FullStall: old.FullStall + stall, LimitHits: hits}
	}
	for _, c := range []struct {
		name string
		now  sample
		want bool
	}{
		{"stalled 70 % at its limit", at(10*time.Second, 7*time.Second, 5000), true},
		{"stalled 70 % without reaching its limit", at(10*time.Second, 7*time.Second, 100), false},
		{"stalled 40 % at its limit", at(10*time.Second, 4*time.Second, 5000), false},
		{"a window cut short by a clock step", at(2*time.Second, 2*time.Second, 5000), false},
	} {
		if got := thrashing(old, c.now); got != c.want {
			t.Errorf("%s: thrashing = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestRead(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("memory.pressure", "some avg10=6.88 avg60=1.2 avg300=0.3 total=1276459\nfull avg10=5.07 avg60=1.0 avg300=0.2 total=952843\n")
	write("memory.events", "low 0\nhigh 0\nmax 2046\noom 0\noom_kill 0\noom_group_kill 0\n")
	s, err := read(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.FullStall != 952843*time.Microsecond || s.LimitHits != 2046 {
		t.Fatalf("read = %+v, want full stall 952.843 ms and 2046 limit hits", s)
	}
	write("memory.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
	if _, err := read(dir); err == nil {
		t.Fatal("read of a memory.pressure without a full line succeeded")
	}
}

func TestCalm(t *testing.T) {
	old := sample{At: time.Unix(1000, 0), FullStall: 5 * time.Second, LimitHits: 100}
	if !calm(old, sample{At: old.At.Add(time.Second), FullStall: old.FullStall, LimitHits: 300}) {
		t.Error("a second without a full stall is not calm")
	}
	if calm(old, sample{At: old.At.Add(time.Second), FullStall: old.FullStall + time.Millisecond, LimitHits: 100}) {
		t.Error("a second with a full stall is calm")
	}
}

// TestTrigger arms the trigger on a real pressure file, the host's
// (skipped where the kernel has no PSI or forbids triggers).
func TestTrigger(t *testing.T) {
	fd, err := openTrigger("/proc/pressure/memory")
	if err != nil {
		t.Skipf("cannot arm a trigger here: %v", err)
	}
	syscall.Close(fd)
	if _, err := openTrigger(filepath.Join(t.TempDir(), "memory.pressure")); err == nil {
		t.Error("openTrigger on a missing file succeeded")
	}
}

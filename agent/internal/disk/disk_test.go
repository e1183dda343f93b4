package disk

import (
	"errors"
	"testing"
	"time"

	"cocoon/agent/internal/apierr"
)

// fake is a device that reaches its new size after a few reads, and an ext4 of 4 KiB blocks.
type fake struct {
	sizes   []uint64
	blocks  uint64
	resized []uint64
}

func (f *fake) system() *System {
	return &System{
		DeviceBytes: func(string) (uint64, error) {
			s := f.sizes[0]
			if len(f.sizes) > 1 {
				f.sizes = f.sizes[1:]
			}
			return s, nil
		},
		Filesystem: func(string) (uint64, uint64, error) { return 4096, f.blocks, nil },
		Resize: func(_ string, blocks uint64) error {
			f.resized = append(f.resized, blocks)
			f.blocks = blocks
			return nil
		},
		Poll: time.Millisecond,
	}
}

const gib = 1 << 30

func TestGrowWaitsForTheDeviceThenFillsIt(t *testing.T) {
	f := &fake{sizes: []uint64{4 * gib, 4 * gib, 6 * gib}, blocks: 4 * gib / 4096}
	res, err := f.system().Grow("/dev/vda", "/", 6*gib, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Grown || res.DeviceBytes != 6*gib || res.FilesystemBytes != 6*gib {
		t.Fatalf("got %+v", res)
	}
	if len(f.resized) != 1 || f.resized[0] != 6*gib/4096 {
		t.Fatalf("resized to %v", f.resized)
	}
}

func TestGrowIsIdempotent(t *testing.T) {
	f := &fake{sizes: []uint64{6 * gib}, blocks: 6 * gib / 4096}
	res, err := f.system().Grow("/dev/vda", "/", 6*gib, time.Second)
	if err != nil || res.Grown || len(f.resized) != 0 {
		t.Fatalf("got %+v, %v, resized %v", res, err, f.resized)
	}
}

func TestGrowGivesUpOnADeviceThatNeverGrows(t *testing.T) {
	f := &fake{sizes: []uint64{4 * gib}, blocks: 4 * gib / 4096}
	_, err := f.system().Grow("/dev/vda", "/", 6*gib, 20*time.Millisecond)
	var e *apierr.Error
	if !errors.As(err, &e) || e.Code != apierr.CodeConflict {
		t.Fatalf("want a Conflict, got %v", err)
	}
	if len(f.resized) != 0 {
		t.Fatalf("resized %v", f.resized)
	}
}

func TestGrowWithoutARootDevice(t *testing.T) {
	f := &fake{sizes: []uint64{4 * gib}}
	if _, err := f.system().Grow("", "/", gib, time.Second); err == nil {
		t.Fatal("want an error")
	}
}

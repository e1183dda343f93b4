package volume

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"cocoon/agent/internal/apierr"
)

func TestCheckPath(t *testing.T) {
	for _, ok := range []string{"/data", "/mnt/vol", "/home/user/work", "/var/lib/db", "/procfs"} {
		if err := CheckPath(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "/", "data", "/data/", "/a/../b", "/proc", "/proc/1", "/sys/x", "/dev", "/etc", "/usr/local", "/a\x00b"} {
		if CheckPath(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// fakeSys is a sysfs with one volume disk, vdb (virtio3), whose serial is cocoon-vol0.
func fakeSys(t *testing.T) *System {
	t.Helper()
	root := t.TempDir()
	mk := func(p string) {
		if err := os.MkdirAll(filepath.Join(root, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mk("sys/devices/virtio3")
	mk("sys/block/vda")
	mk("sys/block/vdb")
	mk("sys/bus/virtio/drivers/virtio_blk")
	mk("sys/bus/virtio/devices/virtio3/block/vdb")
	mk("dev")
	if err := os.WriteFile(filepath.Join(root, "sys/block/vdb/serial"), []byte("cocoon-vol0"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../devices/virtio3", filepath.Join(root, "sys/block/vdb/device")); err != nil {
		t.Fatal(err)
	}
	return &System{Sys: filepath.Join(root, "sys"), Dev: filepath.Join(root, "dev"), Probe: 50 * time.Millisecond}
}

func TestFindsTheDiskBySerialNotOrder(t *testing.T) {
	s := fakeSys(t)
	if got, err := s.findDevice("cocoon-vol0"); err != nil || got != "virtio3" {
		t.Fatalf("findDevice = %q, %v", got, err)
	}
	if _, err := s.findDevice("cocoon-vol1"); err == nil {
		t.Fatal("found a disk for a serial no disk has")
	}
}

func TestMountAllRefusesBadRequestsBeforeTouchingADevice(t *testing.T) {
	s := fakeSys(t)
	for _, m := range []Mount{{Serial: "cocoon-vol0", Path: "/proc/x"}, {Serial: "", Path: "/data"}, {Serial: "../x", Path: "/data"}} {
		err := s.MountAll([]Mount{{Serial: "cocoon-vol0", Path: "/ok"}, m})
		if e, ok := err.(*apierr.Error); !ok || e.Status != 400 {
			t.Fatalf("%+v: %v", m, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(s.Sys, "bus/virtio/drivers/virtio_blk/unbind")); len(b) != 0 {
		t.Fatal("a device was unbound for a refused request")
	}
}

// Package volume mounts the host's persistent volumes inside the guest. A
// volume reaches the guest as a virtio-blk device in a slot the snapshot
// already had (a placeholder of size 0 when the snapshot was made): the host
// restores the VM with the volume's file behind that slot, and the guest
// re-probes the device (unbind and bind virtio_blk) so the kernel reads its
// real capacity and read-only flag. Devices are found by their virtio
// serial, never by their order. The filesystem (ext4) is the volume's own;
// the host never mounts it.
package volume

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
)

// Mount is one volume to mount: the device with virtio serial Serial at Path.
type Mount struct {
	Serial   string `json:"serial"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"readOnly"`
}

// System is where the guest's devices are; tests point it elsewhere.
type System struct {
	Sys string // "/sys"
	Dev string // "/dev"
	// Probe bounds the wait for a re-probed device to appear.
	Probe time.Duration
}

// Real is the guest's own /sys and /dev.
func Real() *System { return &System{Sys: "/sys", Dev: "/dev", Probe: 10 * time.Second} }

// forbidden are the guest paths a volume may not cover (the host refuses
// them first; the agent checks again).
var forbidden = []string{"/proc", "/sys", "/dev", "/run", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot"}

// CheckPath refuses a mount point that is not a clean absolute path, is
// "/", or is in or under a system directory.
func CheckPath(p string) error {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q must be a clean absolute path other than /", p)
	}
	for _, f := range forbidden {
		if p == f || strings.HasPrefix(p, f+"/") {
			return fmt.Errorf("path %q is in %s", p, f)
		}
	}
	return nil
}

// MountAll mounts each volume in turn; the first failure stops it.
func (s *System) MountAll(mounts []Mount) error {
	for _, m := range mounts {
		if err := CheckPath(m.Path); err != nil {
			return apierr.BadRequest(err.Error())
		}
		if m.Serial == "" || strings.ContainsAny(m.Serial, "/\x00") {
			return apierr.BadRequest(fmt.Sprintf("bad serial %q", m.Serial))
		}
	}
	for _, m := range mounts {
		if err := s.mount(m); err != nil {
			return apierr.Internal(fmt.Sprintf("volume %s at %s: %v", m.Serial, m.Path, err))
		}
	}
	return nil
}

func (s *System) mount(m Mount) error {
	virtio, err := s.findDevice(m.Serial)
	if err != nil {
		return err
	}
	// The kernel probed this slot when it was a placeholder: re-probing reads
	// the capacity and read-only flag of what is behind it now, and starts
	// with an empty page cache.
	driver := filepath.Join(s.Sys, "bus/virtio/drivers/virtio_blk")
	if err := os.WriteFile(filepath.Join(driver, "unbind"), []byte(virtio), 0); err != nil {
		return fmt.Errorf("unbinding %s: %w", virtio, err)
	}
	if err := os.WriteFile(filepath.Join(driver, "bind"), []byte(virtio), 0); err != nil {
		return fmt.Errorf("binding %s: %w", virtio, err)
	}
	dev, err := s.waitBlock(virtio)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(m.Path, 0o755); err != nil {
		return err
	}
	flags := uintptr(syscall.MS_NOSUID | syscall.MS_NODEV)
	if m.ReadOnly {
		flags |= syscall.MS_RDONLY
	}
	err = syscall.Mount(dev, m.Path, "ext4", flags, "")
	if err != nil && m.ReadOnly {
		// A journal left to replay by a writer that was killed cannot be
		// replayed on a read-only device: mount without it.
		err = syscall.Mount(dev, m.Path, "ext4", flags, "noload")
	}
	if err != nil {
		return fmt.Errorf("mounting %s: %w", dev, err)
	}
	return nil
}

// findDevice is the virtio device (e.g. "virtio3") of the disk whose serial is serial.
func (s *System) findDevice(serial string) (string, error) {
	disks, err := os.ReadDir(filepath.Join(s.Sys, "block"))
	if err != nil {
		return "", err
	}
	for _, d := range disks {
		own, err := os.ReadFile(filepath.Join(s.Sys, "block", d.Name(), "serial"))
		if err != nil || strings.TrimSpace(string(own)) != serial {
			continue
		}
		target, err := filepath.EvalSymlinks(filepath.Join(s.Sys, "block", d.Name(), "device"))
		if err != nil {
			return "", err
		}
		return filepath.Base(target), nil
	}
	return "", fmt.Errorf("no disk with serial %s", serial)
}

// waitBlock waits for the re-probed virtio device's disk and its device node.
func (s *System) waitBlock(virtio string) (string, error) {
	deadline := time.Now().Add(s.Probe)
	for {
		if names, err := os.ReadDir(filepath.Join(s.Sys, "bus/virtio/devices", virtio, "block")); err == nil && len(names) == 1 {
			dev := filepath.Join(s.Dev, names[0].Name())
			if _, err := os.Stat(dev); err == nil {
				return dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s has no disk %v after it was probed again", virtio, s.Probe)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

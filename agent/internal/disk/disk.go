// Package disk grows the root filesystem online to fill its block device,
// after the host has made the device larger (QMP block_resize): the kernel
// learns the new capacity from the virtio config change, and ext4 grows
// while mounted through EXT4_IOC_RESIZE_FS, so the guest needs no
// e2fsprogs.
package disk

import (
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"

	"cocoon/agent/internal/apierr"
)

const (
	// blkGetSize64 is BLKGETSIZE64, _IOR(0x12, 114, size_t): a block device's size in bytes.
	blkGetSize64 = 0x80081272
	// ext4IocResizeFs is EXT4_IOC_RESIZE_FS, _IOW('f', 16, __u64): grow a mounted ext4 to a block count.
	ext4IocResizeFs = 0x40086610
)

// System is what Grow does to the guest; tests replace it.
type System struct {
	// DeviceBytes is the block device's current size.
	DeviceBytes func(device string) (uint64, error)
	// Filesystem is the mounted filesystem's block size and block count.
	Filesystem func(mountPoint string) (blockSize, blocks uint64, err error)
	// Resize grows the filesystem mounted at mountPoint to blocks.
	Resize func(mountPoint string, blocks uint64) error
	// Poll is how often the device size is read while waiting for it.
	Poll time.Duration
}

// Real is the guest's own devices and filesystems.
func Real() *System {
	return &System{DeviceBytes: deviceBytes, Filesystem: filesystem, Resize: resize, Poll: 50 * time.Millisecond}
}

// Result is POST /disk/grow's answer.
type Result struct {
	DeviceBytes     uint64 `json:"deviceBytes"`
	FilesystemBytes uint64 `json:"filesystemBytes"`
	// Grown is false when the filesystem already filled the device (idempotent).
	Grown bool `json:"grown"`
}

// Grow waits up to timeout for device to reach wantBytes (the host has
// resized it; the guest kernel sees it shortly after), then grows the ext4
// filesystem mounted at mountPoint to fill the device. Calling it again is
// harmless.
func (s *System) Grow(device, mountPoint string, wantBytes uint64, timeout time.Duration) (Result, error) {
	if device == "" {
		return Result{}, apierr.Conflict("the root device is unknown (no cocoon.root on the kernel command line)")
	}
	deadline := time.Now().Add(timeout)
	var size uint64
	for {
		var err error
		if size, err = s.DeviceBytes(device); err != nil {
			return Result{}, apierr.Internal(fmt.Sprintf("%s: %v", device, err))
		}
		if size >= wantBytes {
			break
		}
		if time.Now().After(deadline) {
			return Result{}, apierr.Conflict(fmt.Sprintf("%s is %d bytes after %v, not the %d asked for: was it resized on the host?", device, size, timeout, wantBytes))
		}
		time.Sleep(s.Poll)
	}
	bsize, blocks, err := s.Filesystem(mountPoint)
	if err != nil {
		return Result{}, apierr.Internal(fmt.Sprintf("statfs %s: %v", mountPoint, err))
	}
	if bsize == 0 {
		return Result{}, apierr.Internal(fmt.Sprintf("statfs %s: block size 0", mountPoint))
	}
	target := size / bsize
	if target <= blocks {
		return Result{DeviceBytes: size, FilesystemBytes: blocks * bsize}, nil
	}
	if err := s.Resize(mountPoint, target); err != nil {
		return Result{}, apierr.Internal(fmt.Sprintf("growing %s to %d blocks: %v", mountPoint, target, err))
	}
	_, blocks, err = s.Filesystem(mountPoint)
	if err != nil {
		return Result{}, apierr.Internal(fmt.Sprintf("statfs %s: %v", mountPoint, err))
	}
	return Result{DeviceBytes: size, FilesystemBytes: blocks * bsize, Grown: true}, nil
}

func deviceBytes(device string) (uint64, error) {
	f, err := os.Open(device)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var size uint64
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), blkGetSize64, uintptr(unsafe.Pointer(&size))); e != 0 {
		return 0, e
	}
	return size, nil
}

// filesystem reports statfs's fragment size and total blocks: for ext4 the
// block size and the block count EXT4_IOC_RESIZE_FS speaks in.
func filesystem(mountPoint string) (uint64, uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(mountPoint, &st); err != nil {
		return 0, 0, err
	}
	return uint64(st.Frsize), st.Blocks, nil
}

func resize(mountPoint string, blocks uint64) error {
	f, err := os.Open(mountPoint)
	if err != nil {
		return err
	}
	defer f.Close()
	count := blocks
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), ext4IocResizeFs, uintptr(unsafe.Pointer(&count))); e != 0 {
		return e
	}
	return nil
}

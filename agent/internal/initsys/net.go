package initsys

import (
	"fmt"
	"net"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// ifreq is struct ifreq: 16 bytes of name, then a 24-byte union of which we
// use a sockaddr_in or a short of flags.
type ifreq [40]byte

func newIfreq(name string) *ifreq {
	var r ifreq
	copy(r[:syscall.IFNAMSIZ-1], name)
	return &r
}

func (r *ifreq) setAddr(ip net.IP) {
	sa := (*syscall.RawSockaddrInet4)(unsafe.Pointer(&r[16]))
	sa.Family = syscall.AF_INET
	copy(sa.Addr[:], ip.To4())
}

func (r *ifreq) flags() *uint16 { return (*uint16)(unsafe.Pointer(&r[16])) }

// rtentry mirrors struct rtentry; unsigned long and pointers are uintptr, so
// natural alignment reproduces the C layout.
type rtentry struct {
	pad1    uintptr
	dst     syscall.RawSockaddrInet4
	gateway syscall.RawSockaddrInet4
	genmask syscall.RawSockaddrInet4
	flags   uint16
	pad2    int16
	pad3    uintptr
	pad4    uintptr
	metric  int16
	dev     *byte
	mtu     uintptr
	window  uintptr
	irtt    uint16
}

func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, uintptr(p)); e != 0 {
		return e
	}
	return nil
}

// configureIf assigns ip/mask to ifname and brings it up.
func configureIf(fd int, ifname string, ip net.IP, mask net.IPMask) error {
	r := newIfreq(ifname)
	r.setAddr(ip)
	if err := ioctlPtr(fd, syscall.SIOCSIFADDR, unsafe.Pointer(r)); err != nil {
		return fmt.Errorf("%s: SIOCSIFADDR %s: %w", ifname, ip, err)
	}
	r = newIfreq(ifname)
	r.setAddr(net.IP(mask))
	if err := ioctlPtr(fd, syscall.SIOCSIFNETMASK, unsafe.Pointer(r)); err != nil {
		return fmt.Errorf("%s: SIOCSIFNETMASK: %w", ifname, err)
	}
	r = newIfreq(ifname)
	if err := ioctlPtr(fd, syscall.SIOCGIFFLAGS, unsafe.Pointer(r)); err != nil {
		return fmt.Errorf("%s: SIOCGIFFLAGS: %w", ifname, err)
	}
	*r.flags() |= syscall.IFF_UP | syscall.IFF_RUNNING
	if err := ioctlPtr(fd, syscall.SIOCSIFFLAGS, unsafe.Pointer(r)); err != nil {
		return fmt.Errorf("%s: SIOCSIFFLAGS: %w", ifname, err)
	}
	return nil
}

func addDefaultRoute(fd int, gw net.IP) error {
	var rt rtentry
	rt.dst.Family = syscall.AF_INET
	rt.genmask.Family = syscall.AF_INET
	rt.gateway.Family = syscall.AF_INET
	copy(rt.gateway.Addr[:], gw.To4())
	rt.flags = syscall.RTF_UP | syscall.RTF_GATEWAY
	err := ioctlPtr(fd, syscall.SIOCADDRT, unsafe.Pointer(&rt))
	if err == syscall.EEXIST {
		return nil
	}
	if err != nil {
		return fmt.Errorf("SIOCADDRT default via %s: %w", gw, err)
	}
	return nil
}

// ConfigureNetwork brings up lo and, when an address is given, eth0 with its
// default route. The virtio NIC can show up a little after boot, hence the
// wait.
func ConfigureNetwork(ip *net.IPNet, gw net.IP) error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer syscall.Close(fd)
	if err := configureIf(fd, "lo", net.IPv4(127, 0, 0, 1), net.CIDRMask(8, 32)); err != nil {
		return err
	}
	if ip == nil {
		return nil
	}
	if err := waitFor("/sys/class/net/eth0", 5*time.Second); err != nil {
		return fmt.Errorf("eth0: %w", err)
	}
	if err := configureIf(fd, "eth0", ip.IP, ip.Mask); err != nil {
		return err
	}
	if gw != nil {
		return addDefaultRoute(fd, gw)
	}
	return nil
}

func waitFor(path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v", path, limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

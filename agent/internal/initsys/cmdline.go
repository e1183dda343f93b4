// Package initsys is the agent's PID-1 half: it turns a freshly booted
// kernel with our initramfs into a running guest (mounts, modules, switch to
// the image disk, network) and keeps PID 1 alive whatever happens.
package initsys

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// DefaultPort is the control port unless cocoon.port says otherwise.
const DefaultPort = 10789

// Config is the cocoon.* part of the kernel command line.
type Config struct {
	Root     string     // cocoon.root: block device with the ext4 image
	Token    string     // the initial secret: TokenFile in the initramfs, never the command line
	IP       *net.IPNet // cocoon.ip: eth0 address with prefix (default /24)
	Gateway  net.IP     // cocoon.gw
	DNS      []net.IP   // cocoon.dns (comma-separated)
	Hostname string     // cocoon.hostname
	Port     int        // cocoon.port

	// Workload is set by Boot (not the command line): the cgroup to start
	// processes in, once it is set up.
	Workload string
}

// ParseCmdline extracts the cocoon.* parameters from a /proc/cmdline. Bad
// values are reported but do not stop the rest from being parsed: a boot
// with a typo should still come up far enough to be debugged.
func ParseCmdline(cmdline string) (*Config, []error) {
	c := &Config{Port: DefaultPort}
	var errs []error
	for _, f := range strings.Fields(cmdline) {
		if !strings.HasPrefix(f, "cocoon.") {
			continue
		}
		kv := strings.SplitN(strings.TrimPrefix(f, "cocoon."), "=", 2)
		if len(kv) != 2 {
			continue
		}
		k, v := kv[0], kv[1]
		switch k {
		case "root":
			c.Root = v
		case "hostname":
			c.Hostname = v
		case "port":
			p, err := strconv.Atoi(v)
			if err != nil || p <= 0 || p > 65535 {
				errs = append(errs, fmt.Errorf("cocoon.port=%q: invalid port", v))
				continue
			}
			c.Port = p
		case "ip":
			if !strings.Contains(v, "/") {
				v += "/24"
			}
			ip, n, err := net.ParseCIDR(v)
			if err != nil || ip.To4() == nil {
				errs = append(errs, fmt.Errorf("cocoon.ip=%q: not an IPv4 CIDR", v))
				continue
			}
			c.IP = &net.IPNet{IP: ip.To4(), Mask: n.Mask}
		case "gw":
			ip := net.ParseIP(v).To4()
			if ip == nil {
				errs = append(errs, fmt.Errorf("cocoon.gw=%q: not an IPv4 address", v))
				continue
			}
			c.Gateway = ip
		case "dns":
			for _, s := range strings.Split(v, ",") {
				ip := net.ParseIP(s)
				if ip == nil {
					errs = append(errs, fmt.Errorf("cocoon.dns=%q: not an IP address", s))
					continue
				}
				c.DNS = append(c.DNS, ip)
			}
		}
	}
	return c, errs
}

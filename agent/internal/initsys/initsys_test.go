package initsys

import (
	"net"
	"os"
	"testing"
	"unsafe"
)

func TestParseCmdline(t *testing.T) {
	// A secret on the command line is ignored: only TokenFile carries it.
	c, errs := ParseCmdline("console=ttyS0 quiet cocoon.root=/dev/vda cocoon.token=s3cr3t cocoon.ip=10.0.2.15/24 " +
		"cocoon.gw=10.0.2.2 cocoon.dns=10.0.2.3,1.1.1.1 cocoon.hostname=box cocoon.port=1234 cocoon.unknown=x init=/init\n")
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	if c.Root != "/dev/vda" || c.Token != "" || c.Hostname != "box" || c.Port != 1234 {
		t.Fatalf("%+v", c)
	}
	if c.IP.String() != "10.0.2.15/24" || !c.Gateway.Equal(net.IPv4(10, 0, 2, 2)) || len(c.DNS) != 2 {
		t.Fatalf("%+v", c)
	}

	c, errs = ParseCmdline("cocoon.ip=10.0.2.15 cocoon.port=notaport cocoon.gw=bad")
	if len(errs) != 2 || c.Port != DefaultPort || c.IP.String() != "10.0.2.15/24" || c.Gateway != nil {
		t.Fatalf("%+v %v", c, errs)
	}
}

func TestReadToken(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/token"
	if _, err := readToken(path); err == nil {
		t.Fatal("a missing token file must be an error")
	}
	if err := os.WriteFile(path, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readToken(path); err == nil {
		t.Fatal("an empty token must be an error")
	}
	if err := os.WriteFile(path, []byte("s3cr3t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if tok, err := readToken(path); err != nil || tok != "s3cr3t" {
		t.Fatalf("got %q, %v", tok, err)
	}
}

// The ioctl structs must match the kernel's layout exactly (64-bit).
func TestIoctlLayouts(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("layout checked for 64-bit only")
	}
	var rt rtentry
	for name, got := range map[string]uintptr{
		"size":    unsafe.Sizeof(rt),
		"dst":     unsafe.Offsetof(rt.dst),
		"gateway": unsafe.Offsetof(rt.gateway),
		"genmask": unsafe.Offsetof(rt.genmask),
		"flags":   unsafe.Offsetof(rt.flags),
		"metric":  unsafe.Offsetof(rt.metric),
		"dev":     unsafe.Offsetof(rt.dev),
		"irtt":    unsafe.Offsetof(rt.irtt),
	} {
		want := map[string]uintptr{"size": 120, "dst": 8, "gateway": 24, "genmask": 40, "flags": 56, "metric": 80, "dev": 88, "irtt": 112}[name]
		if got != want {
			t.Errorf("rtentry.%s at %d, want %d", name, got, want)
		}
	}
	r := newIfreq("eth0")
	r.setAddr(net.IPv4(10, 0, 2, 15))
	if r[16] != 2 || r[17] != 0 || r[20] != 10 || r[23] != 15 || string(r[:4]) != "eth0" || r[4] != 0 {
		t.Fatalf("ifreq %v", r[:24])
	}
}

func TestJoinErrors(t *testing.T) {
	if joinErrors(nil, nil) != nil {
		t.Fatal("nil expected")
	}
	if e := joinErrors(nil, errString("a"), errString("b")); e.Error() != "a; b" {
		t.Fatal(e)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

func TestWorkloadMemoryLimit(t *testing.T) {
	const MiB = 1 << 20
	// A 512 MiB guest: 470 MiB managed, 429 MiB available once booted.
	limit, err := workloadMemoryLimit(470*MiB, 429*MiB)
	if err != nil || limit != 429*MiB-memoryReserve(470*MiB) {
		t.Fatalf("512 MiB guest: limit %d, %v", limit, err)
	}
	// The reserve comes off what is available, not off the total.
	if limit > 470*MiB-memoryReserve(470*MiB)-40*MiB {
		t.Fatalf("limit %d ignores the 41 MiB the booted guest holds", limit)
	}
	if _, err := workloadMemoryLimit(200*MiB, 60*MiB); err == nil {
		t.Fatal("a guest with 60 of 200 MiB available got a workload limit")
	}
}

func TestWorkloadTaskLimit(t *testing.T) {
	// A 512 MiB guest: 3,643 kernel tasks, a 375 MiB workload.
	if got := workloadTaskLimit(3643, 375<<20); got != 1500 {
		t.Fatalf("512 MiB guest: %d tasks", got)
	}
	// The kernel's own bound wins where it is lower.
	if got := workloadTaskLimit(1000, 375<<20); got != 900 {
		t.Fatalf("kernel bound: %d tasks", got)
	}
}

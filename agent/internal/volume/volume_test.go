package volume

import "testing"

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

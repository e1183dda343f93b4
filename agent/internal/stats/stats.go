// Package stats samples guest resource usage from /proc and statfs.
package stats

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Stats is GET /stats. Fields that cannot be read stay 0.
type Stats struct {
	MemTotalBytes     uint64  `json:"memTotalBytes"`
	MemAvailableBytes uint64  `json:"memAvailableBytes"`
	CPUTotalTicks     uint64  `json:"cpuTotalTicks"`
	CPUIdleTicks      uint64  `json:"cpuIdleTicks"`
	DiskTotalBytes    uint64  `json:"diskTotalBytes"`
	DiskUsedBytes     uint64  `json:"diskUsedBytes"`
	NetRxBytes        uint64  `json:"netRxBytes"`
	NetTxBytes        uint64  `json:"netTxBytes"`
	LoadAvg1          float64 `json:"loadAvg1"`
}

// Read samples everything; disk usage is that of the filesystem at root.
func Read(root string) Stats {
	var s Stats
	readMem(&s)
	readCPU(&s)
	readDisk(&s, root)
	readNet(&s)
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			s.LoadAvg1, _ = strconv.ParseFloat(f[0], 64)
		}
	}
	return s
}

// eachLine calls fn with every line of a /proc file; a file that cannot be
// opened leaves the fields it feeds at 0.
func eachLine(path string, fn func(line string)) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fn(sc.Text())
	}
}

func readMem(s *Stats) {
	eachLine("/proc/meminfo", func(line string) {
		f := strings.Fields(line)
		if len(f) < 2 {
			return
		}
		v, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "MemTotal:":
			s.MemTotalBytes = v * 1024
		case "MemAvailable:":
			s.MemAvailableBytes = v * 1024
		}
	})
}

// readCPU sums the aggregate "cpu" line; iowait counts as idle, as top does.
func readCPU(s *Stats) {
	eachLine("/proc/stat", func(line string) {
		f := strings.Fields(line)
		if len(f) < 5 || f[0] != "cpu" {
			return
		}
		for i, x := range f[1:] {
			v, _ := strconv.ParseUint(x, 10, 64)
			// guest and guest_nice (fields 9, 10) are already in user/nice.
			if i >= 8 {
				break
			}
			s.CPUTotalTicks += v
			if i == 3 || i == 4 {
				s.CPUIdleTicks += v
			}
		}
	})
}

func readDisk(s *Stats, root string) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(root, &st); err != nil {
		return
	}
	bs := uint64(st.Bsize)
	s.DiskTotalBytes = st.Blocks * bs
	s.DiskUsedBytes = (st.Blocks - st.Bfree) * bs
}

// readNet sums every interface except loopback.
func readNet(s *Stats) {
	eachLine("/proc/net/dev", func(line string) {
		i := strings.IndexByte(line, ':')
		if i < 0 {
			return
		}
		name := strings.TrimSpace(line[:i])
		f := strings.Fields(line[i+1:])
		if name == "lo" || len(f) < 9 {
			return
		}
		rx, _ := strconv.ParseUint(f[0], 10, 64)
		tx, _ := strconv.ParseUint(f[8], 10, 64)
		s.NetRxBytes += rx
		s.NetTxBytes += tx
	})
}

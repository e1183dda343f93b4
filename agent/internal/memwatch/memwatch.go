// Package memwatch ends the workload's biggest process when the workload
// thrashes at its memory limit.
//
// The kernel's OOM killer acts only when reclaim makes no progress at all. A
// workload at memory.max whose own page cache (its binaries, its pipes) is
// reclaimed and read back again makes just enough progress to escape it, and
// can sit there for minutes with every task stalled: a `head | tail`
// pipeline twice the guest's memory was fully stalled 70 % of the time, with
// no OOM kill in 60 s. Like systemd-oomd, memwatch reads the workload's
// pressure stall information (PSI) and acts when the whole workload has been
// stalled on memory for most of a window while it kept hitting its limit. It
// reads them only once a PSI trigger has reported a stall (see Watch).
package memwatch

import (
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	// interval between readings of the workload's counters.
	interval = time.Second
	// window is how many intervals the stall is measured over.
	window = 10
	// stallShare is the share of the window the whole workload must have
	// been stalled on memory ("full" pressure) to be thrashing.
	stallShare = 0.6
)

// sample is one reading of a cgroup's memory counters.
type sample struct {
	At time.Time
	// FullStall is the cumulative time all of the cgroup's tasks were
	// stalled on memory (memory.pressure "full total").
	FullStall time.Duration
	// LimitHits counts how often the cgroup reached memory.max
	// (memory.events "max").
	LimitHits uint64
}

// thrashing says whether the cgroup thrashed at its limit between old and
// now: it hit its limit, and its tasks were all stalled on memory for at
// least stallShare of the time. A window much shorter than planned (a clock
// step, as after a snapshot restore) never counts.
func thrashing(old, now sample) bool {
	elapsed := now.At.Sub(old.At)
	if elapsed < window*interval/2 {
		return false
	}
	return now.LimitHits > old.LimitHits && float64(now.FullStall-old.FullStall) >= stallShare*float64(elapsed)
}

// Watch waits for the workload to stall on memory and, whenever it then
// thrashes, kills its process with the highest OOM score, as the kernel's OOM
// killer would have. It never returns.
//
// An idle guest must cost its host nothing, so Watch does not poll: it arms a
// PSI trigger on the workload's memory.pressure and sleeps in ppoll until the
// kernel reports a stall; only then does it read the counters every interval,
// until the workload has been calm for a whole window. A kernel that refuses
// the trigger gets the interval loop all the time.
func Watch(dir string) {
	trigger, err := openTrigger(filepath.Join(dir, "memory.pressure"))
	if err != nil {
		log.Printf("cocoon-agent: memwatch: no PSI trigger (%v); reading the counters every %v", err, interval)
	}
	for {
		if trigger >= 0 {
			if err := waitTrigger(trigger); err != nil {
				log.Printf("cocoon-agent: memwatch: PSI trigger: %v; reading the counters every %v", err, interval)
				syscall.Close(trigger)
				trigger = -1
			}
		}
		watchWhileStalled(dir, trigger >= 0)
	}
}

// watchWhileStalled reads dir's counters every interval and acts on
// thrashing. With untilCalm it returns once a whole window has passed and
// the last interval saw no full stall; without, it never returns.
func watchWhileStalled(dir string, untilCalm bool) {
	var history []sample
	warned := false
	for range time.Tick(interval) {
		s, err := read(dir)
		if err != nil {
			if !warned {
				log.Printf("cocoon-agent: memwatch: %v; not watching until it can be read", err)
				warned = true
			}
			history = history[:0]
			continue
		}
		history = append(history, s)
		if len(history) <= window {
			continue
		}
		history = history[len(history)-window-1:]
		if !thrashing(history[0], s) {
			if untilCalm && calm(history[len(history)-2], s) {
				return
			}
			continue
		}
		stalled := (s.FullStall - history[0].FullStall).Seconds()
		if victim, err := killBiggest(dir); err != nil {
			log.Printf("cocoon-agent: memwatch: the workload is thrashing at its memory limit but: %v", err)
		} else {
			log.Printf("cocoon-agent: memwatch: killed %s: the workload was stalled on memory %.1f s of the last %.0f s at its limit",
				victim, stalled, s.At.Sub(history[0].At).Seconds())
		}
		// The next kill needs a whole window of its own.
		history = history[:0]
	}
}

// calm says whether the workload was never fully stalled on memory between
// two readings.
func calm(old, now sample) bool {
	return now.FullStall == old.FullStall
}

// triggerSpec wakes the watcher when the whole workload was stalled on memory
// for 200 ms within two seconds, well before a window of thrashing (a
// two-second window is also what an unprivileged writer may ask for).
const triggerSpec = "full 200000 2000000"

// openTrigger arms a PSI trigger on a memory pressure file and returns its
// descriptor (raw, so Go's poller never takes it over).
func openTrigger(pressure string) (int, error) {
	fd, err := syscall.Open(pressure, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if _, err := syscall.Write(fd, []byte(triggerSpec+"\x00")); err != nil {
		syscall.Close(fd)
		return -1, fmt.Errorf("arm %q: %w", triggerSpec, err)
	}
	return fd, nil
}

// waitTrigger blocks until the trigger on fd fires (POLLPRI).
func waitTrigger(fd int) error {
	const pollPri, pollErr = 0x2, 0x8
	pfd := struct {
		fd      int32
		events  int16
		revents int16
	}{fd: int32(fd), events: pollPri}
	for {
		_, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, 0, 0, 0, 0)
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		if pfd.revents&pollErr != 0 {
			return fmt.Errorf("the trigger's cgroup is gone")
		}
		if pfd.revents&pollPri != 0 {
			return nil
		}
	}
}

// read takes a sample of the cgroup v2 directory dir.
func read(dir string) (sample, error) {
	s := sample{At: time.Now()}
	pressure, err := os.ReadFile(filepath.Join(dir, "memory.pressure"))
	if err != nil {
		return s, err
	}
	total, ok := field(string(pressure), "full", "total=")
	if !ok {
		return s, fmt.Errorf("%s/memory.pressure has no full total", dir)
	}
	s.FullStall = time.Duration(total) * time.Microsecond
	events, err := os.ReadFile(filepath.Join(dir, "memory.events"))
	if err != nil {
		return s, err
	}
	if s.LimitHits, ok = field(string(events), "max", ""); !ok {
		return s, fmt.Errorf("%s/memory.events has no max count", dir)
	}
	return s, nil
}

// field finds the line starting with key and returns the number after
// prefix in its words ("" prefix: the second word).
func field(text, key, prefix string) (uint64, bool) {
	for _, line := range strings.Split(text, "\n") {
		words := strings.Fields(line)
		if len(words) < 2 || words[0] != key {
			continue
		}
		for _, w := range words[1:] {
			if strings.HasPrefix(w, prefix) {
				n, err := strconv.ParseUint(strings.TrimPrefix(w, prefix), 10, 64)
				return n, err == nil
			}
		}
	}
	return 0, false
}

// killBiggest SIGKILLs the process of the cgroup with the highest
// /proc/PID/oom_score (which honours oom_score_adj; -1000 is never chosen)
// and describes it.
func killBiggest(dir string) (string, error) {
	procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return "", err
	}
	best, bestScore := 0, -1
	for _, f := range strings.Fields(string(procs)) {
		pid, _ := strconv.Atoi(f)
		score, err1 := readInt(fmt.Sprintf("/proc/%d/oom_score", pid))
		adj, err2 := readInt(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
		if err1 != nil || err2 != nil || adj == -1000 {
			continue
		}
		if score > bestScore {
			best, bestScore = pid, score
		}
	}
	if best == 0 {
		return "", fmt.Errorf("no process of %s can be killed", dir)
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", best))
	rss := ""
	if statm, err := os.ReadFile(fmt.Sprintf("/proc/%d/statm", best)); err == nil {
		if f := strings.Fields(string(statm)); len(f) > 1 {
			if pages, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				rss = fmt.Sprintf(", %d MiB resident", pages*int64(os.Getpagesize())>>20)
			}
		}
	}
	if err := syscall.Kill(best, syscall.SIGKILL); err != nil {
		return "", fmt.Errorf("kill %d: %w", best, err)
	}
	return fmt.Sprintf("pid %d (%s%s)", best, strings.TrimSpace(string(comm)), rss), nil
}

func readInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

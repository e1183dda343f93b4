package initsys

import (
	"bufio"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

// rootWait bounds the wait for the root block device to be probed.
const rootWait = 10 * time.Second

const (
	ramfsMagic = 0x858458f6
	tmpfsMagic = 0x01021994
)

func logf(format string, args ...interface{}) {
	log.Printf("cocoon-agent: "+format, args...)
}

// HandleSignals keeps PID 1 alive. The Go runtime's default for SIGTERM,
// SIGINT, SIGHUP, SIGQUIT, SIGABRT... is to exit, and PID 1 exiting panics
// the kernel. They are caught and dropped rather than ignored: SIG_IGN would
// be inherited across exec by every process we start, a caught signal is
// reset to default.
func HandleSignals() {
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGABRT, syscall.SIGTRAP, syscall.SIGSTKFLT, syscall.SIGSYS,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGPIPE, syscall.SIGALRM,
		syscall.SIGPWR, syscall.SIGXCPU, syscall.SIGXFSZ, syscall.SIGVTALRM)
	go func() {
		for s := range ch {
			if s != syscall.SIGPIPE {
				logf("ignoring signal %v", s)
			}
		}
	}()
}

// Boot runs the PID-1 sequence of PROTOCOL.md. Every step is attempted even
// after an earlier one failed; failures are printed to the console and
// returned together, for /health to report. It never panics.
func Boot() (cfg *Config, err error) {
	var errs []error
	fail := func(step string, err error) {
		if err != nil {
			err = fmt.Errorf("%s: %w", step, err)
			logf("boot: %v", err)
			errs = append(errs, err)
		}
	}
	defer func() {
		if v := recover(); v != nil {
			fail("panic", fmt.Errorf("%v", v))
		}
		if cfg == nil {
			cfg = &Config{Port: DefaultPort}
		}
		err = joinErrors(errs...)
	}()

	fail("mount early filesystems", mountEarly())
	fixConsole()

	cmdline, rerr := os.ReadFile("/proc/cmdline")
	fail("read /proc/cmdline", rerr)
	var perrs []error
	cfg, perrs = ParseCmdline(string(cmdline))
	for _, e := range perrs {
		fail("kernel command line", e)
	}

	fail("load modules", loadModules("/etc/cocoon/modules"))
	// Read before the switch to the image disk deletes the initramfs.
	token, terr := readToken(TokenFile)
	fail("read the initial secret", terr)
	cfg.Token = token

	if cfg.Root == "" {
		fail("root", errors.New("cocoon.root is not set; staying on the initramfs"))
	} else if err := waitFor(cfg.Root, rootWait); err != nil {
		fail("root", err)
	} else {
		fail("switch root", switchRoot(cfg.Root))
	}

	fail("mount runtime filesystems", mountLate())
	if cfg.Hostname != "" {
		fail("hostname", syscall.Sethostname([]byte(cfg.Hostname)))
	}
	if err := setupWorkload(WorkloadCgroup); err != nil {
		fail("workload cgroup", err)
	} else {
		cfg.Workload = WorkloadCgroup
	}
	fail("network", ConfigureNetwork(cfg.IP, cfg.Gateway))
	if len(cfg.DNS) > 0 {
		fail("resolv.conf", writeResolvConf(cfg.DNS))
	}
	return cfg, nil
}

// TokenFile holds the initial secret. The host appends it to the initramfs
// of each cold boot, so it is never on the kernel command line, which every
// local user of the host can read in /proc.
const TokenFile = "/etc/cocoon/token"

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return token, nil
}

func mount(source, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount(source, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s: %w", fstype, target, err)
	}
	return nil
}

func mountEarly() error {
	var errs []error
	// EBUSY: the kernel (CONFIG_DEVTMPFS_MOUNT) or a previous step got there.
	for _, m := range []struct{ src, dst, fs string }{
		{"devtmpfs", "/dev", "devtmpfs"},
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
	} {
		if err := mount(m.src, m.dst, m.fs, syscall.MS_NOSUID, ""); err != nil && !errors.Is(err, syscall.EBUSY) {
			errs = append(errs, err)
		}
	}
	return joinErrors(errs...)
}

// fixConsole points fds 0-2 at /dev/console when the kernel could not (no
// /dev/console in the initramfs), so boot messages reach the serial log.
func fixConsole() {
	var bad []int
	for fd := 0; fd <= 2; fd++ {
		if _, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0); e != 0 {
			bad = append(bad, fd)
		}
	}
	if len(bad) == 0 {
		return
	}
	c, err := syscall.Open("/dev/console", syscall.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for _, fd := range bad {
		if fd != c {
			_ = syscall.Dup3(c, fd, 0)
		}
	}
	if c > 2 {
		syscall.Close(c)
	}
}

// loadModules loads, in order, the modules listed in listPath (one path per
// line, relative to /lib/modules/). A missing list means a kernel with
// everything built in.
func loadModules(listPath string) error {
	f, err := os.Open(listPath)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var errs []error
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" || strings.HasPrefix(name, "#") {
			continue
		}
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join("/lib/modules", name)
		}
		if err := finitModule(p); err != nil {
			errs = append(errs, err)
		}
	}
	return joinErrors(errs...)
}

func finitModule(path string) error {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	defer syscall.Close(fd)
	params := []byte{0}
	var flags uintptr
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(path, ext) {
			flags |= 4 // MODULE_INIT_COMPRESSED_FILE: let the kernel decompress
		}
	}
	_, _, e := syscall.Syscall(sysFinitModule, uintptr(fd), uintptr(unsafe.Pointer(&params[0])), flags)
	if e != 0 && e != syscall.EEXIST {
		return fmt.Errorf("finit_module %s: %w", path, e)
	}
	return nil
}

// switchRoot mounts dev on /newroot and makes it /, as switch_root(8) does:
// the initramfs is emptied first (its memory is otherwise never freed),
// then /dev, /proc and /sys move along and the new root is moved over /.
func switchRoot(dev string) error {
	const newRoot = "/newroot"
	if err := mount(dev, newRoot, "ext4", 0, ""); err != nil {
		return err
	}
	if err := removeInitramfs(newRoot); err != nil {
		// Not fatal: it only wastes memory.
		logf("boot: clean initramfs: %v", err)
	}
	for _, d := range []string{"/dev", "/proc", "/sys"} {
		if err := mount(d, newRoot+d, "", syscall.MS_MOVE, ""); err != nil {
			return err
		}
	}
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := syscall.Mount(".", "/", "", syscall.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move %s onto /: %w", newRoot, err)
	}
	if err := syscall.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return os.Chdir("/")
}

// removeInitramfs deletes the files of the initramfs, never crossing into
// another filesystem (the mounts under it, the new root). It refuses to run
// unless / really is a ramfs/tmpfs, as a guard against wiping a disk.
func removeInitramfs(keep string) error {
	var sfs syscall.Statfs_t
	if err := syscall.Statfs("/", &sfs); err != nil {
		return err
	}
	if sfs.Type != ramfsMagic && sfs.Type != tmpfsMagic {
		return fmt.Errorf("/ is not an initramfs (fs type %#x); not deleting", sfs.Type)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat("/", &st); err != nil {
		return err
	}
	entries, err := os.ReadDir("/")
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := "/" + e.Name()
		if p != keep {
			removeTree(p, st.Dev)
		}
	}
	return nil
}

func removeTree(p string, dev uint64) {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil || st.Dev != dev {
		return
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		if entries, err := os.ReadDir(p); err == nil {
			for _, e := range entries {
				removeTree(filepath.Join(p, e.Name()), dev)
			}
		}
		_ = syscall.Rmdir(p)
		return
	}
	_ = syscall.Unlink(p)
}

// mountLate sets up what the image's processes expect at runtime.
func mountLate() error {
	var errs []error
	ptsOpts := "mode=0620,ptmxmode=0666"
	if g, err := user.LookupGroup("tty"); err == nil {
		if _, err := strconv.Atoi(g.Gid); err == nil {
			ptsOpts += ",gid=" + g.Gid
		}
	}
	for _, m := range []struct {
		src, dst, fs string
		flags        uintptr
		data         string
	}{
		{"devpts", "/dev/pts", "devpts", syscall.MS_NOSUID | syscall.MS_NOEXEC, ptsOpts},
		{"shm", "/dev/shm", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=0755"},
	} {
		if err := mount(m.src, m.dst, m.fs, m.flags, m.data); err != nil && !errors.Is(err, syscall.EBUSY) {
			errs = append(errs, err)
		}
	}
	// devtmpfs lacks the conventional links that shells rely on (<(...)).
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, link); err != nil && !os.IsExist(err) {
			errs = append(errs, err)
		}
	}
	return joinErrors(errs...)
}

// WorkloadCgroup is the cgroup every process the agent starts is placed in
// before it runs (see process.SetWorkload); the agent itself stays in the root.
const WorkloadCgroup = "/sys/fs/cgroup/cocoon-workload"

// memoryReserve is what the workload must leave of the memory available when
// it is set up: an eighth of the total, within bounds, for the agent's growth
// (exec output it buffers, its HTTP connections), the kernel's use outside
// the workload's account (a few KiB for every task it runs: 15 MiB for the
// 2,500 tasks of a fork bomb in a 512 MiB guest), the page allocator's
// watermarks and the network buffers that keep the agent reachable.
func memoryReserve(total int64) int64 {
	r := total / 8
	if r < 24<<20 {
		r = 24 << 20
	}
	if r > 256<<20 {
		r = 256 << 20
	}
	return r
}

// workloadMemoryLimit is the workload's memory.max: what is available once
// the kernel and the agent have booted, less the reserve. Counting from the
// total instead ignored the 40 MiB the booted kernel already holds in a
// 512 MiB guest, so a fork bomb held to its limit still ran the whole guest
// out of memory, and the agent stalled in reclaim for over 30 s.
func workloadMemoryLimit(total, available int64) (int64, error) {
	limit := available - memoryReserve(total)
	if limit < total/4 {
		return 0, fmt.Errorf("%d bytes available of %d is too little to set %d aside", available, total, memoryReserve(total))
	}
	return limit, nil
}

// setupWorkload mounts the cgroup v2 hierarchy and creates dir under its root
// with three controllers, so that nothing the guest runs can starve PID 1:
//   - memory: the workload may use what the booted guest has available but
//     memoryReserve, kernel memory included, so it runs into its own OOM
//     killer before the guest runs short: a fork bomb of thousands of small processes would otherwise
//     exhaust memory with page tables and kernel stacks, and the global OOM
//     killer, freeing one small process at a time, stalls the whole guest
//     (the agent's network buffers included) for minutes;
//   - pids: the workload may hold at most 90 % of the tasks the kernel
//     allows, so the agent can still fork and create threads (the Go runtime
//     dies when it cannot, and PID 1 dying is a kernel panic), and at most
//     tasksPerMiB for each MiB of its memory (workloadTaskLimit);
//   - cpu: the whole workload weighs as much as one agent thread (the default
//     weight), so the agent gets about half the CPU when it needs it, however
//     many processes compete with it.
func setupWorkload(dir string) error {
	const root = "/sys/fs/cgroup"
	if err := mount("cgroup2", root, "cgroup2", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, ""); err != nil && !errors.Is(err, syscall.EBUSY) {
		return err
	}
	tasks, err := taskLimit()
	if err != nil {
		return err
	}
	total, available, err := memInfo()
	if err != nil {
		return err
	}
	limit, err := workloadMemoryLimit(total, available)
	if err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	for _, w := range []struct{ file, value string }{
		{filepath.Join(root, "cgroup.subtree_control"), "+cpu +memory +pids"},
		{filepath.Join(dir, "memory.max"), strconv.FormatInt(limit, 10)},
		{filepath.Join(dir, "pids.max"), strconv.FormatInt(workloadTaskLimit(tasks, limit), 10)},
	} {
		if err := os.WriteFile(w.file, []byte(w.value), 0); err != nil {
			return fmt.Errorf("write %q to %s: %w", w.value, w.file, err)
		}
	}
	return nil
}

// tasksPerMiB bounds the workload's tasks by its memory, so that a fork bomb
// of small shells (about 140 KiB of kernel and user memory each) is stopped
// by its task limit, whose failed forks cost nothing, well before its memory
// limit: there, reclaim evicts the shells' own code pages, which they read
// back from disk, and 2,800 thrashing shells took over a minute to die once
// killed. 4 per MiB is 1,500 tasks in a 512 MiB guest (Lambda allows 1,024
// per execution environment).
const tasksPerMiB = 4

// workloadTaskLimit is the workload's pids.max: 90 % of the tasks the kernel
// allows, and at most tasksPerMiB for each MiB of its memory limit.
func workloadTaskLimit(kernelTasks int, memoryLimit int64) int64 {
	limit := int64(kernelTasks) * 9 / 10
	if byMemory := memoryLimit >> 20 * tasksPerMiB; byMemory < limit {
		limit = byMemory
	}
	return limit
}

// taskLimit is how many tasks (threads and processes) the kernel allows in
// all: kernel.threads-max, which scales with memory, or pid_max if lower.
func taskLimit() (int, error) {
	limit := 0
	for _, f := range []string{"/proc/sys/kernel/threads-max", "/proc/sys/kernel/pid_max"} {
		b, err := os.ReadFile(f)
		if err != nil {
			return 0, err
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		if limit == 0 || n < limit {
			limit = n
		}
	}
	return limit, nil
}

// memInfo is the memory the kernel manages and the memory available for new
// work without swapping (MemTotal and MemAvailable), in bytes.
func memInfo() (total, available int64, err error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, 0, err
	}
	fields := map[string]*int64{"MemTotal:": &total, "MemAvailable:": &available}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || fields[f[0]] == nil {
			continue
		}
		kb, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("/proc/meminfo: %w", err)
		}
		*fields[f[0]] = kb << 10
	}
	if total == 0 || available == 0 {
		return 0, 0, errors.New("/proc/meminfo lacks MemTotal or MemAvailable")
	}
	return total, available, nil
}

// writeResolvConf replaces /etc/resolv.conf, which in many images is a
// symlink into a resolver daemon's runtime dir that will never exist here;
// the rename replaces the link itself.
func writeResolvConf(servers []net.IP) error {
	var b strings.Builder
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if err := os.MkdirAll("/etc", 0o755); err != nil {
		return err
	}
	tmp := "/etc/.resolv.conf.cocoon"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, "/etc/resolv.conf")
}

// joinErrors is errors.Join, which Go 1.19 lacks: nil when there is no
// error, the messages joined by "; " otherwise.
func joinErrors(errs ...error) error {
	var msgs []string
	for _, e := range errs {
		if e != nil {
			msgs = append(msgs, e.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}

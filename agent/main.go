// Command cocoon-agent is the guest side of Cocoon: PID 1 of the microVM
// and its HTTP control server (see PROTOCOL.md). Run as any other PID it is
// just the server, for testing on a host.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"runtime/debug"
	"time"

	"cocoon/agent/internal/initsys"
	"cocoon/agent/internal/memwatch"
	"cocoon/agent/internal/process"
	"cocoon/agent/internal/server"
)

func main() {
	log.SetFlags(0)
	if os.Getpid() == 1 {
		runInit()
		return
	}
	listen := flag.String("listen", "127.0.0.1:10789", "address to serve on")
	token := flag.String("token", "", "bearer secret (default $COCOON_TOKEN)")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *version {
		fmt.Println(server.Version)
		return
	}
	if *token == "" {
		*token = os.Getenv("COCOON_TOKEN")
	}
	if *token == "" {
		log.Fatal("cocoon-agent: -token (or $COCOON_TOKEN) is required")
	}
	// Behave as in a guest: orphans of what we start come back to us, and
	// the reaper, started before anything can fork, is the only wait4 caller.
	if err := process.SetSubreaper(); err != nil {
		log.Printf("cocoon-agent: PR_SET_CHILD_SUBREAPER: %v", err)
	}
	process.DefaultReaper()
	srv := server.New(server.Options{Token: *token})
	log.Printf("cocoon-agent %s: listening on %s", server.Version, *listen)
	log.Fatal(httpServer(*listen, srv).ListenAndServe())
}

func httpServer(addr string, h http.Handler) *http.Server {
	// No read/write timeouts: exec streams, log follows and terminals are
	// long-lived by design.
	return &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 30 * time.Second}
}

// runInit never returns: PID 1 exiting is a kernel panic.
func runInit() {
	started := time.Now()
	defer func() {
		if v := recover(); v != nil {
			log.Printf("cocoon-agent: panic: %v\n%s", v, debug.Stack())
		}
		select {}
	}()
	initsys.HandleSignals()
	// Orphans are re-parented to us from the first moment.
	process.DefaultReaper()
	log.Printf("cocoon-agent %s: booting", server.Version)

	cfg, err := initsys.Boot()
	// From now on every process we start runs in the workload cgroup.
	if werr := process.SetWorkload(cfg.Workload); werr != nil && err == nil {
		err = werr
	}
	if cfg.Workload != "" {
		go memwatch.Watch(cfg.Workload)
	}
	srv := server.New(server.Options{Token: cfg.Token, Started: started, RootDevice: cfg.Root})
	if err != nil {
		srv.SetDegraded(err.Error())
	}
	addr := fmt.Sprintf("0.0.0.0:%d", cfg.Port)
	for {
		log.Printf("cocoon-agent: listening on %s", addr)
		err := httpServer(addr, srv).ListenAndServe()
		log.Printf("cocoon-agent: serve: %v; retrying", err)
		time.Sleep(time.Second)
	}
}

package server

import (
	"os"
	"testing"

	"cocoon/agent/internal/process"
)

// TestMain makes the test binary a child subreaper, so orphans of the
// processes under test are re-parented to it as they would be to the agent
// as PID 1, and the reaper's orphan path is exercised too.
func TestMain(m *testing.M) {
	_ = process.SetSubreaper()
	process.DefaultReaper()
	os.Exit(m.Run())
}

import ArgumentParser
import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount a rawmount mount; returns after the image is flushed and closed.",
        discussion: String(Examples.section("unmount").dropFirst(2)))

    @Option(help: "Seconds to wait for the server to flush and exit.")
    var timeout: Double = 120

    @Argument(help: "The mountpoint given to `rawmount mount`, or a file it shows (its raw file).", completion: .directory)
    var mountpoint: String

    func run() throws {
        var mp: String
        do { mp = try Paths.mountpointPath(mountpoint) } catch {
            printError("rawmount: \(describe(error))"); throw ExitCode.failure
        }
        // The raw file (or a partition file) names its mount: the directory it is shown in.
        if !MountTable.isRawmount(mp), let named = try? Paths.asNamed(mountpoint) {
            let parent = PathName.directory(of: named)
            if MountTable.isRawmount(parent) { mp = parent }
        }
        guard MountTable.isRawmount(mp) else {
            printError("rawmount: \(mountpoint): not a rawmount mount")
            throw ExitCode.failure
        }
        let pidFile = try Paths.pidFile(forMountpoint: mp)
        let pid = Paths.readFile(pidFile).flatMap { pid_t($0.trimmingSpaces) }
        // Checked before unmounting: a live server exits by itself right after.
        let serverDied = pid.map { !processAlive($0) } ?? false
        if umount2(mp, 8 /* UMOUNT_NOFOLLOW: a symlink put at its name is not followed */) != 0 {
            let e = errno
            if e == EPERM {
                let rc = run(["fusermount3", "-u", mp])
                if rc != 0 { throw ExitCode(rc) }
            } else {
                printError("rawmount: \(mountpoint): \(String(cString: strerror(e)))")
                if e == EBUSY {
                    let users = Holders.mountUsers(mp)
                    for u in users { printError("rawmount: \(mp): \(u)") }
                    if users.isEmpty { printError("rawmount: \(mp): close the files and detach the loop devices that use it first") }
                }
                throw ExitCode.failure
            }
        }
        guard let pid else { return }
        if serverDied {
            // It died without cleaning up (killed, or crashed): nothing was flushed at exit.
            unlink(pidFile)
            if let overlayFile = try? Paths.overlayFile(forMountpoint: mp) { unlink(overlayFile) }
            printError("rawmount: \(mountpoint): unmounted; its server (pid \(pid)) had already exited, so the image was not closed cleanly (writes it had not flushed may be lost)")
            return
        }
        // The server flushes and closes the image when its loop ends; wait for that.
        let deadline = monotonicSeconds() + timeout
        while processAlive(pid) {
            if monotonicSeconds() > deadline {
                printError("rawmount: \(mountpoint): unmounted, but server \(pid) has not exited after \(Int(timeout)) s")
                throw ExitCode.failure
            }
            usleep(10_000)
        }
        let errorFile = try Paths.closeErrorFile(forMountpoint: mp)
        if let problems = Paths.readFile(errorFile) {
            unlink(errorFile)
            for line in problems.split(separator: "\n") { printError("rawmount: \(mountpoint): unmounted, but \(line)") }
            throw ExitCode.failure
        }
    }

    private func run(_ argv: [String]) -> Int32 {
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        guard posix_spawnp(&pid, argv[0], nil, nil, &cargs, environ) == 0 else { return 1 }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        return (status >> 8) & 0xff
    }
}

/// True while `pid` exists and is not a zombie (a detached server's reaper may be slow).
func processAlive(_ pid: pid_t) -> Bool {
    if kill(pid, 0) != 0 && errno == ESRCH { return false }
    guard let stat = Paths.readFile("/proc/\(pid)/stat"),
          let close = stat.lastIndex(of: ")") else { return false }
    let rest = stat[stat.index(after: close)...].drop(while: { $0 == " " })
    return rest.first != "Z" && rest.first != "X"
}



extension String {
    var trimmingSpaces: String {
        String(self.drop(while: { $0.isWhitespace }).reversed().drop(while: { $0.isWhitespace }).reversed())
    }
}

import Foundation
import XCTest

/// rawmount as the system runs it: installed by `make install`, started by mount(8) from an
/// fstab line or `mount -t fuse.rawmount`, and telling the user what happened.
final class SystemIntegrationTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func testInstalledRawmountMountsFromFstabAndMountHelper() throws {
        try Harness.tool("man")
        let s = try Scratch()
        let stage = s.path("stage")
        let root = Harness.packageRoot.path
        try Harness.run(["make", "-s", "-C", root, "install", "DESTDIR=\(stage)", "PREFIX=/usr/local", "BIN=\(Harness.rawmount)"])
        let prefix = stage + "/usr/local"
        let installed = ["bin/rawmount", "lib/rawmount/librawmount-nbdkit.so", "share/man/man1/rawmount.1", "share/bash-completion/completions/rawmount",
                         "share/zsh/site-functions/_rawmount", "share/fish/vendor_completions.d/rawmount.fish"]
        for f in installed { XCTAssertTrue(FileManager.default.fileExists(atPath: prefix + "/" + f), f) }

        // The manual covers every verb and the options mount(8) users need.
        let manual = try Harness.run(["env", "MANWIDTH=200", "man", "-l", prefix + "/share/man/man1/rawmount.1"]).out
        for verb in ["mount", "unmount", "list", "info", "create", "check", "bitmap", "hash", "verify", "backup", "compare", "rebase", "commit", "resize", "map", "convert", "serve"] {
            XCTAssertTrue(manual.contains("     \(verb)"), "man page lacks the verb \(verb)")
        }
        for option in ["--overlay", "--force-share", "uid=", "umask=", "nofail", "--quiet", "--verbose"] {
            XCTAssertTrue(manual.contains(option), "man page lacks \(option)")
        }
        // Examples for the verbs, an fstab line, a forensic session, and where to read more.
        for text in ["rawmount mount -r", "rawmount convert -O qcow2", "fuse.rawmount ro,allow_other", "--overlay notes.qcow2", "qemu-img(1)"] {
            XCTAssertTrue(manual.contains(text), "man page lacks the example \(text)")
        }
        // Completions parse, and offer the format and subformat values.
        try Harness.run(["bash", "-n", prefix + "/share/bash-completion/completions/rawmount"])
        let bash = try String(contentsOfFile: prefix + "/share/bash-completion/completions/rawmount", encoding: .utf8)
        XCTAssertTrue(bash.contains("streamOptimized") && bash.contains("qcow2"), "bash completion lacks format values")
        let fish = try String(contentsOfFile: prefix + "/share/fish/vendor_completions.d/rawmount.fish", encoding: .utf8)
        XCTAssertTrue(fish.contains("monolithicSparse") && fish.contains("vdi"), "fish completion lacks format values")

        // A 0600 image owned by root, with data where qemu-io put it.
        let img = s.path("disk.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "64M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 1M 2M", "-c", "write -P 0xa5 40M 64k", img])
        chmod(img, 0o600)
        let oracle = s.path("oracle.raw")
        try Harness.run(["qemu-img", "convert", "-O", "raw", img, oracle])
        let fstab = s.path("fstab")
        try "\(img) \(s.mnt) fuse.rawmount ro,allow_other,nofail,_netdev,x-systemd.device-timeout=5,uid=1234,gid=2345,umask=027 0 0\n"
            .write(toFile: fstab, atomically: true, encoding: .utf8)
        // mount.fuse3 runs `rawmount` with the shell's default PATH (mount(8) clears PATH), so
        // the staged bin/ is bound over /usr/local/bin in a mount namespace of its own.
        let script = """
            set -u
            trap 'umount -l \(s.mnt) 2>/dev/null' EXIT
            mount --bind \(prefix)/bin /usr/local/bin || exit 90
            mount -T \(fstab) \(s.mnt) || { echo "fstab mount failed"; exit 91; }
            echo "fstab: $(stat -c '%a %u %g' \(s.mnt)/disk.raw) $(grep -c ' \(s.mnt) .* - fuse.rawmount ' /proc/self/mountinfo)"
            cmp \(s.mnt)/disk.raw \(oracle) && echo "fstab: same"
            grep ' \(s.mnt) ' /proc/self/mounts | grep -q allow_other && echo "fstab: allow_other"
            rawmount unmount \(s.mnt) || exit 92
            mount -t fuse.rawmount \(img) \(s.mnt) -o ro,format=vmdk || { echo "mount -t failed"; exit 93; }
            echo "helper: $(stat -c '%a %u' \(s.mnt)/disk.raw)"
            cmp \(s.mnt)/disk.raw \(oracle) && echo "helper: same"
            rawmount unmount \(s.mnt)/disk.raw || exit 94
            grep -c ' \(s.mnt) ' /proc/self/mountinfo
            mount -t fuse.rawmount \(img) \(s.mnt) -o ro,format=qcow2 2>&1 || echo "wrong format refused"
            trap - EXIT
            """
        let r = try Harness.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], check: false)
        let out = r.out
        XCTAssertEqual(r.status, 0, r.err + out)
        XCTAssertTrue(out.contains("fstab: 440 1234 2345 1"), out)   // umask 027 over 0666, write bits dropped (ro)
        XCTAssertTrue(out.contains("fstab: same"), out)
        XCTAssertTrue(out.contains("fstab: allow_other"), out)
        XCTAssertTrue(out.contains("helper: 400 0"), out)             // the image's 0600, write bit dropped
        XCTAssertTrue(out.contains("helper: same"), out)
        XCTAssertTrue(out.contains("\n0\n"), "unmount by the raw file's path left a mount: \(out)")
        XCTAssertTrue(out.contains("wrong format refused") && out.contains("disk.vmdk"), out)
        XCTAssertFalse(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status == 0)

        // The installed binary finds the installed nbdkit plugin (../lib/rawmount).
        try Harness.tool("nbdkit")
        let server = try NbdServeTests.Server(["--read-only", "--unix", s.path("inst.sock"), img], binary: prefix + "/bin/rawmount")
        XCTAssertTrue(try Harness.run(["nbdinfo", "--size", server.uri]).out.hasPrefix("67108864"))
        XCTAssertEqual(server.stop(), 0)

        try Harness.run(["make", "-s", "-C", root, "uninstall", "DESTDIR=\(stage)", "PREFIX=/usr/local"])
        for f in installed { XCTAssertFalse(FileManager.default.fileExists(atPath: prefix + "/" + f), "uninstall left \(f)") }
    }

    /// `make deb` packages the release binary (Swift's standard library and Foundation linked
    /// in) with Depends taken from what it loads: unpacked, it mounts, serves and runs with the
    /// Swift toolchain's libraries hidden (a private mount namespace), where a binary linked
    /// against the toolchain does not even start.
    func testPackageRunsWithoutTheSwiftToolchain() throws {
        let root = Harness.packageRoot.path
        let release = root + "/.build/release/rawmount"
        XCTAssertTrue(FileManager.default.fileExists(atPath: release), "make test builds the release binary first")
        // Where the toolchain's runtime is: from the debug binary, which links against it.
        let ldd = try Harness.run(["ldd", Harness.rawmount]).out
        let core = try XCTUnwrap(ldd.split(separator: "\n").first { $0.contains("libswiftCore.so") })
        let swiftLib = try XCTUnwrap(core.split(separator: " ").first { $0.hasPrefix("/") }.map { String($0).split(separator: "/").dropLast().joined(separator: "/") })
        XCTAssertFalse(try Harness.run(["ldd", release]).out.contains("/" + swiftLib), "the release binary loads the toolchain's libraries")

        let s = try Scratch()
        let deb = try Harness.run(["make", "-s", "-C", root, "deb", "BIN=\(release)", "OUT=\(s.dir)"]).out
            .split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(deb.hasSuffix(".deb") && FileManager.default.fileExists(atPath: deb), deb)
        let depends = try Harness.run(["dpkg-deb", "-f", deb, "Depends"]).out
        for p in ["fuse3", "libfuse3-3", "zlib1g", "libzstd1", "libdeflate0", "libisal2", "libc6"] {
            XCTAssertTrue(depends.contains(p), "Depends lacks \(p): \(depends)")
        }
        XCTAssertTrue(try Harness.run(["dpkg-deb", "-f", deb, "Recommends"]).out.contains("bash-completion"))
        let unpacked = s.path("root")
        try Harness.run(["dpkg-deb", "-x", deb, unpacked])
        for f in ["usr/bin/rawmount", "usr/lib/rawmount/librawmount-nbdkit.so", "usr/share/man/man1/rawmount.1",
                  "usr/share/bash-completion/completions/rawmount", "usr/share/zsh/site-functions/_rawmount"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: unpacked + "/" + f), f)
        }
        let img = s.path("disk.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        try Harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", img])
        let bin = unpacked + "/usr/bin/rawmount"
        let script = """
            mount -t tmpfs none /\(swiftLib) || exit 90
            \(Harness.rawmount) --version >/dev/null 2>&1 && echo "toolchain binary started" || echo "toolchain binary needs the toolchain"
            \(bin) info \(img) | grep -q 'format: qcow2' && echo "info ok"
            \(bin) mount \(img) \(s.mnt) >/dev/null && cmp -n 65536 -i 1048576:0 \(s.mnt)/disk.raw <(head -c 65536 /dev/zero | tr '\\000' Z) && echo "mount ok"
            \(bin) unmount \(s.mnt)
            nbdkit --dump-plugin \(unpacked)/usr/lib/rawmount/librawmount-nbdkit.so >/dev/null && echo "plugin ok"
            # Installed for real, with dpkg, into overlays of /usr, /var and /etc that vanish with
            # this namespace: then mount(8) finds the helper on the default PATH, from fstab.
            mkdir -p \(s.dir)/ov && mount -t tmpfs none \(s.dir)/ov || exit 94
            for d in usr var etc; do
              mkdir -p \(s.dir)/ov/$d/up \(s.dir)/ov/$d/work
              mount -t overlay overlay -o lowerdir=/$d,upperdir=\(s.dir)/ov/$d/up,workdir=\(s.dir)/ov/$d/work /$d || exit 92
            done
            mount -t tmpfs none /\(swiftLib) || exit 93
            dpkg -i \(deb) >/dev/null && dpkg -s rawmount | grep -q 'Status: install ok installed' && echo "dpkg ok"
            [ "$(command -v rawmount)" = /usr/bin/rawmount ] && echo "on PATH"
            echo "\(img) \(s.mnt) fuse.rawmount ro,nofail 0 0" > \(s.path("fstab"))
            mount -T \(s.path("fstab")) \(s.mnt) && cmp -n 65536 -i 1048576:0 \(s.mnt)/disk.raw <(head -c 65536 /dev/zero | tr '\\000' Z) && echo "fstab ok"
            rawmount list | grep -q disk.qcow2 && echo "list ok"
            rawmount unmount \(s.mnt)
            # Bash completion loads as bash-completion loads it on a stock system (on demand).
            bash -c 'source /usr/share/bash-completion/bash_completion; _completion_loader rawmount; complete -p rawmount' | grep -q rawmount && echo "completion ok"
            ls /usr/share/man/man1/rawmount.1* >/dev/null && echo "man ok"
            dpkg -r rawmount >/dev/null && [ ! -e /usr/bin/rawmount ] && echo "removed ok"
            """
        let r = try Harness.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], check: false)
        XCTAssertTrue(r.out.contains("toolchain binary needs the toolchain"), "hiding the toolchain did not work: \(r.out) \(r.err)")
        for line in ["info ok", "mount ok", "plugin ok", "dpkg ok", "on PATH", "fstab ok", "list ok", "completion ok", "man ok", "removed ok"] { XCTAssertTrue(r.out.contains(line), "\(line): \(r.out) \(r.err)") }
    }

    /// rawmount's own options through `-o` (what mount(8) can pass), mount(8)'s options
    /// ignored, libfuse's refusal passed on as libfuse said it, and what a mount prints.
    func testDashOCarriesRawmountOptionsAndMountPrintsWhatItShows() throws {
        let s = try Scratch()
        let img = s.path("snap.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "32M"])
        try Harness.run(["qemu-io", "-c", "write -P 0x11 0 1M", img])
        try Harness.run(["qemu-img", "snapshot", "-c", "before", img])
        try Harness.run(["qemu-io", "-c", "write -P 0x22 0 1M", img])
        let log = s.path("requests.log")
        let r = try Harness.run([Harness.rawmount, img, s.mnt, "-o",
                                 "snapshot=before,log=\(log),uid=7,gid=8,umask=077,nofail,_netdev,x-gvfs-show,dev,suid,defaults,relatime,nodiratime,noexec,nosuid,nodev"])
        XCTAssertEqual(r.out, "\(s.mnt)/snap.raw\n", "mount prints the file it shows")
        try s.forgetMount(s.mnt)
        let oracle = s.path("before.raw")
        try Harness.run(["qemu-img", "convert", "-U", "-l", "snapshot.name=before", "-O", "raw", img, oracle])
        XCTAssertEqual(try Files.read(s.mnt + "/snap.raw"), try Files.read(oracle), "-o snapshot= shows the snapshot")
        XCTAssertEqual(try Harness.run(["stat", "-c", "%a %u %g", s.mnt + "/snap.raw"]).out, "400 7 8\n")
        XCTAssertTrue(FileManager.default.fileExists(atPath: log), "-o log= opened the log")
        try Harness.run([Harness.rawmount, "unmount", s.mnt + "/snap.raw"])

        // Given twice with different values: refused, nothing mounted.
        let twice = try Harness.run([Harness.rawmount, "mount", "-f", "qcow2", img, s.mnt, "-o", "format=vmdk"], check: false)
        XCTAssertNotEqual(twice.status, 0)
        XCTAssertTrue(twice.err.contains("format=vmdk") && twice.err.contains("qcow2"), twice.err)
        let badMask = try Harness.run([Harness.rawmount, img, s.mnt, "-o", "umask=999"], check: false)
        XCTAssertNotEqual(badMask.status, 0)
        XCTAssertTrue(badMask.err.contains("umask=999"), badMask.err)
        // An option libfuse does not know: its own words reach the user of the detached mount.
        let bogus = try Harness.run([Harness.rawmount, img, s.mnt, "-o", "ro,frobnicate"], check: false)
        XCTAssertEqual(bogus.status, 1)
        XCTAssertTrue(bogus.err.contains("fuse: unknown option") && bogus.err.contains("frobnicate"), bogus.err)
        XCTAssertFalse(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status == 0)

        // --quiet prints nothing; list marks a server that died, and unmount clears it.
        let quiet = try Harness.run([Harness.rawmount, "mount", "-q", "-r", img, s.mnt])
        XCTAssertEqual(quiet.out, "")
        let listed = try Harness.run([Harness.rawmount, "list", "--json"]).out
        let rows = try JSONSerialization.jsonObject(with: Data(listed.utf8)) as? [[String: Any]] ?? []
        let row = rows.first { $0["mountpoint"] as? String == s.mnt }
        XCTAssertEqual(row?["server"] as? String, "running", listed)
        XCTAssertEqual(row?["read-only"] as? Bool, true, listed)
        let pid = try XCTUnwrap(row?["pid"] as? Int)
        kill(pid_t(pid), SIGKILL)
        usleep(200_000)
        let dead = try Harness.run([Harness.rawmount, "list"]).out
        XCTAssertTrue(dead.contains("\(s.mnt)\t\(img)\tro\tserver died (pid \(pid))"), dead)
        let cleared = try Harness.run([Harness.rawmount, "unmount", s.mnt])
        XCTAssertTrue(cleared.err.contains("had already exited"), cleared.err)
    }

    /// In the foreground, the server says what it serves and reports each failed request on
    /// its terminal, without --log.
    func testForegroundServerSaysWhatItServesAndReportsFailedRequests() throws {
        let s = try Scratch()
        let img = s.path("cut.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"])
        try Harness.run(["qemu-io", "-c", "write -P 0x33 0 64k", "-c", "write -P 0x44 8M 64k", img])
        // Make the L2 entry of guest offset 8M point at an unaligned offset: reading there
        // fails with EIO, the rest reads.
        let bytes = try Files.read(img)
        let be64 = { (o: Int) in bytes.subdata(in: o..<o + 8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        let l2 = be64(Int(be64(40))) & 0x00ff_ffff_ffff_fe00
        try Files.pwrite(img, (0..<8).map { UInt8(truncatingIfNeeded: (UInt64(1) << 63 | 0x50200) >> (56 - 8 * UInt64($0))) }, at: l2 + 128 * 8)
        let server = Process()
        server.executableURL = URL(fileURLWithPath: Harness.rawmount)
        server.arguments = ["mount", "--foreground", "-r", img, s.mnt]
        let out = Pipe(), err = Pipe()
        server.standardOutput = out
        server.standardError = err
        try server.run()
        let first = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        XCTAssertEqual(first, "serving \(img) at \(s.mnt)/cut.raw\n")
        let fd = open(s.mnt + "/cut.raw", O_RDONLY | 0o40000)  // O_DIRECT: past the page cache
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { buf.deallocate() }
        XCTAssertEqual(pread(fd, buf, 65536, 0), 65536)
        XCTAssertEqual(pread(fd, buf, 65536, 8 << 20), -1)
        XCTAssertEqual(errno, EIO)
        close(fd)
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        server.waitUntilExit()
        let log = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        XCTAssertTrue(log.contains("rawmount: read") && log.contains("at 8388608") && log.contains("cut.qcow2"), log)
    }

    /// Who holds an image or a mount is named, not guessed.
    func testLockRefusalAndBusyUnmountNameTheHolder() throws {
        let s = try Scratch()
        let img = s.path("held.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", img, "16M"])
        try s.mount(img)
        let other = s.path("other")
        try FileManager.default.createDirectory(atPath: other, withIntermediateDirectories: true)
        let again = try Harness.run([Harness.rawmount, "mount", "-r", img, other], check: false)
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.err.contains("held by rawmount (pid") && again.err.contains("serving \(s.mnt))"), again.err)
        let check = try Harness.run([Harness.rawmount, "check", img], check: false)
        XCTAssertTrue(check.err.contains("serving \(s.mnt)"), check.err)

        // A reader with the raw file open, then a loop device over it.
        let reader = Process()
        reader.executableURL = URL(fileURLWithPath: "/bin/sh")
        reader.arguments = ["-c", "exec sleep 30 < \(s.mnt)/held.raw"]
        try reader.run()
        usleep(300_000)
        let busy = try Harness.run([Harness.rawmount, "unmount", s.mnt], check: false)
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.err.contains("sleep (pid \(reader.processIdentifier)) has \(s.mnt)/held.raw open"), busy.err)
        reader.terminate(); reader.waitUntilExit()
        let loop = try Harness.run(["losetup", "-f", "--show", "-r", s.mnt + "/held.raw"]).out.trimmingCharacters(in: .whitespacesAndNewlines)
        let busyLoop = try Harness.run([Harness.rawmount, "unmount", s.mnt + "/held.raw"], check: false)
        try Harness.run(["losetup", "-d", loop])
        XCTAssertEqual(busyLoop.status, 1)
        XCTAssertTrue(busyLoop.err.contains("\(loop) is a loop device over \(s.mnt)/held.raw"), busyLoop.err)
        // Released: unmount by the raw file's path.
        var done = try Harness.run([Harness.rawmount, "unmount", s.mnt + "/held.raw"], check: false)
        for _ in 0..<20 where done.status != 0 {  // the loop device lets go asynchronously
            usleep(100_000)
            done = try Harness.run([Harness.rawmount, "unmount", s.mnt + "/held.raw"], check: false)
        }
        XCTAssertEqual(done.status, 0, done.err)
        try s.forgetMount(s.mnt)
    }
}

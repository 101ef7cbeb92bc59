import Foundation
import XCTest
import TestSupport

/// Images and names built as an attacker would: each test fails if the escape, hang or bomb
/// it reproduces comes back (issue 10).
final class HostileInputTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    /// The line of /proc/self/mountinfo for `mp`: (mount options, source, super options).
    func mountInfo(_ mp: String) throws -> (options: [String], source: String, superOptions: [String])? {
        let text = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ").map(String.init)
            guard parts.count > 5, parts[4] == mp, let dash = parts.firstIndex(of: "-"), dash + 3 < parts.count else { continue }
            return (parts[5].split(separator: ",").map(String.init), parts[dash + 2], parts[dash + 3].split(separator: ",").map(String.init))
        }
        return nil
    }

    /// mountinfo's escaping of a source name (space, tab, newline, backslash as \ooo).
    func mangled(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if b == 0x20 || b == 0x09 || b == 0x0A || b == 0x5C { out += "\\" + String(format: "%03o", b) }
            else { out.unicodeScalars.append(Unicode.Scalar(b)) }
        }
        return out
    }

    func testFileNamesCannotInjectMountOptions() throws {
        let s = try Scratch()
        let names = ["e\\,allow_other.qed", "tail\\", "a,b=c d.qed", "new\nline,allow_other", "x=1,ro,allow_other=1", "\\\\,\\012,dev"]
        for name in names {
            let img = s.path(name)
            try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
            try s.mount(img)
            guard let info = try mountInfo(s.mnt) else { XCTFail("\(name): not in mountinfo"); continue }
            XCTAssertEqual(info.source, mangled(img), name)
            XCTAssertEqual(info.superOptions.sorted(), ["default_permissions", "group_id=0", "rw", "user_id=0"], name)
            XCTAssertEqual(info.options.first, "rw", name)
            XCTAssertFalse(info.options.contains("ro"), name)
            // `list` and `unmount` still know the mount (a swallowed subtype hid it).
            XCTAssertTrue(try Harness.run([Harness.rawmount, "list"]).out.contains(img), name)
            try Files.pwrite(s.mnt + "/" + Paths.rawName(name), [1, 2, 3], at: 0)
            try s.unmount()
            try Harness.run(["qemu-img", "check", "-q", img])
        }
        // Names that are not UTF-8 cannot be carried through faithfully: refused by name.
        let bad = s.dir + "/x\u{FF}"
        let r = try Harness.run(["sh", "-c", "cp \"$1\" \"$2\"\"$(printf '\\377')\" && exec \"$3\" mount \"$2\"\"$(printf '\\377')\" \"$4\"", "sh",
                                 s.path(names[0]), s.dir + "/x", Harness.rawmount, s.mnt], check: false)
        XCTAssertEqual(r.status, 1, r.err)
        XCTAssertTrue(r.err.contains("not valid UTF-8") && r.err.contains("x\\xff"), r.err + bad)
        XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0)
    }

    func testSymlinkedExtentOutsideTheFolderIsNeverWritten() throws {
        let s = try Scratch()
        let folder = s.path("vm"), elsewhere = s.path("elsewhere")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: elsewhere, withIntermediateDirectories: true)
        let victim = elsewhere + "/victim.bin"
        try Harness.run(["dd", "if=/dev/urandom", "of=\(victim)", "bs=1M", "count=2", "status=none"])
        let before = try Files.sha(victim)
        for sub in ["monolithicFlat", "twoGbMaxExtentSparse"] {
            let desc = folder + "/\(sub).vmdk"
            try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=\(sub)", desc, "2M"])
            let ext = sub == "monolithicFlat" ? "\(sub)-flat.vmdk" : "\(sub)-s001.vmdk"
            if sub != "monolithicFlat" { try FileManager.default.copyItem(atPath: folder + "/" + ext, toPath: elsewhere + "/" + ext) }
            let target = sub == "monolithicFlat" ? victim : elsewhere + "/" + ext
            let targetBefore = try Files.sha(target)
            try FileManager.default.removeItem(atPath: folder + "/" + ext)
            try FileManager.default.createSymbolicLink(atPath: folder + "/" + ext, withDestinationPath: target)
            let r = try Harness.run([Harness.rawmount, "mount", desc, s.mnt])
            XCTAssertTrue(r.err.contains("outside the descriptor's folder") && r.err.contains("read-only"), r.err)
            XCTAssertEqual(try mountInfo(s.mnt)?.options.first, "ro", sub)
            XCTAssertEqual(open(s.mnt + "/\(sub).raw", O_WRONLY), -1, sub)
            XCTAssertEqual(errno, EROFS, sub)
            // Still readable, as QEMU follows the link.
            XCTAssertEqual(try Files.read(s.mnt + "/\(sub).raw").count, 2 << 20)
            try Harness.run([Harness.rawmount, "unmount", s.mnt])
            XCTAssertEqual(try Files.sha(target), targetBefore, "\(sub): the file outside the folder changed")
        }
        XCTAssertEqual(try Files.sha(victim), before)
    }

    func testFallocateCannotForgeAHeaderInAProbedRawImage() throws {
        let s = try Scratch()
        let img = s.path("plain.img")
        try Harness.run(["truncate", "-s", "8M", img])
        try s.mount(img)
        let raw = s.mnt + "/plain.raw"
        // "QED\x01" is no header; punching or zeroing byte 3 would make it "QED\0".
        try Files.pwrite(raw, Array("QED".utf8) + [1], at: 0)
        let fd = open(raw, O_RDWR)
        for mode: Int32 in [0x02 | 0x01, 0x10] {  // PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
            XCTAssertEqual(fallocate(fd, mode, 3, 1), -1, "fallocate mode \(mode) forged a QED header")
            XCTAssertEqual(errno, EPERM)
        }
        // Zeroing elsewhere still works.
        XCTAssertEqual(fallocate(fd, 0x03, 4096, 4096), 0)
        close(fd)
        try s.unmount()
        XCTAssertTrue(try Harness.run([Harness.rawmount, "info", img]).out.contains("format: raw"))
        XCTAssertEqual([UInt8](try Files.read(img).prefix(4)), Array("QED".utf8) + [1])
    }

    func testRawFileModeAndOwnerFollowTheImage() throws {
        let s = try Scratch()
        let img = s.path("secret.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        try Harness.run(["chmod", "0600", img])
        try Harness.run(["chown", "65534:65534", img])
        for (opts, mode) in [([String](), 0o600), (["-r"], 0o400)] {
            try s.mount(img, options: opts)
            var st = stat()
            XCTAssertEqual(stat(s.mnt + "/secret.raw", &st), 0)
            XCTAssertEqual(st.st_mode & 0o7777, mode_t(mode), "\(opts)")
            XCTAssertEqual(st.st_uid, 65534)
            XCTAssertEqual(st.st_gid, 65534)
            try s.unmount()
        }
    }

    func testFifosAreRefusedWithoutHanging() throws {
        let s = try Scratch()
        let fifo = s.path("pipe.img")
        XCTAssertEqual(mkfifo(fifo, 0o644), 0)
        try s.assertMountRefused([fifo], mentions: ["pipe.img", "FIFO"], "FIFO image")
        let info = try Harness.run([Harness.rawmount, "info", fifo], check: false)
        XCTAssertEqual(info.status, 1)
        XCTAssertTrue(info.err.contains("FIFO"), info.err)
        let over = s.path("over.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", over, "8M"])
        try s.assertMountRefused(["-r", over], mentions: ["pipe.img", "FIFO"], "FIFO backing file")
        let qed = s.path("over.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-u", "-b", fifo, "-F", "raw", qed, "8M"])
        try s.assertMountRefused([qed], mentions: ["pipe.img", "FIFO"], "FIFO backing file, writable mount")
    }

    func testPseudoFileSystemsAreRefusedAsMountpoints() throws {
        let s = try Scratch()
        let img = s.path("d.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        // A private proc and sysfs instance, so a failure hides nothing the system needs.
        for type in ["proc", "sysfs"] {
            let dir = try s.kernelFileSystem(type)
            let r = try Harness.run([Harness.rawmount, "mount", img, dir], check: false)
            XCTAssertEqual(r.status, 1, r.err)
            XCTAssertTrue(r.err.contains(type) && r.err.contains("pseudo file system"), r.err)
            XCTAssertNil(try mountInfo(dir).flatMap { $0.source == img ? $0 : nil }, "mounted on \(type)")
        }
        let inDev = "/dev/shm/rawmount-test-\(getpid())"
        try FileManager.default.createDirectory(atPath: inDev, withIntermediateDirectories: true)
        defer { _ = try? Harness.run(["umount", "-l", inDev], check: false); try? FileManager.default.removeItem(atPath: inDev) }
        let r = try Harness.run([Harness.rawmount, "mount", img, inDev], check: false)
        XCTAssertEqual(r.status, 1, r.err)
        XCTAssertTrue(r.err.contains("inside /dev"), r.err)
    }

    /// Another user could plant /tmp/rawmount-<uid> (or a link there) before us.
    func testPidFolderOfAnotherOwnerIsRefused() throws {
        try Harness.tool("setpriv")
        try Harness.tool("fusermount3")
        let s = try Scratch()
        let img = s.path("user.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", img, "8M"])
        try Harness.run(["chown", "65534:65534", img])
        try Harness.run(["chmod", "0777", s.dir, s.mnt])
        let bin = s.path("rawmount")
        try FileManager.default.copyItem(atPath: Harness.rawmount, toPath: bin)
        let asNobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "HOME=/tmp"]
        let dir = "/tmp/rawmount-65534"
        var st = stat()
        XCTAssertEqual(stat("/dev/fuse", &st), 0)
        let fuseMode = st.st_mode & 0o777
        defer { chmod("/dev/fuse", fuseMode); _ = try? Harness.run(["rm", "-rf", dir], check: false) }
        chmod("/dev/fuse", 0o666)
        let planted = s.path("planted")
        try FileManager.default.createDirectory(atPath: planted, withIntermediateDirectories: true)
        try Harness.run(["chmod", "0777", planted])
        let setups: [(String, [String])] = [
            ("owned by root", ["sh", "-c", "rm -rf \(dir) && mkdir -m 0755 \(dir)"]),
            ("writable by all", ["sh", "-c", "rm -rf \(dir) && mkdir -m 0777 \(dir) && chown 65534 \(dir)"]),
            ("a symlink", ["sh", "-c", "rm -rf \(dir) && ln -s \(planted) \(dir)"]),
        ]
        for (what, setup) in setups {
            try Harness.run(setup)
            let r = try Harness.run(asNobody + [bin, "mount", img, s.mnt], check: false)
            XCTAssertEqual(r.status, 1, "\(what): \(r.err)")
            XCTAssertTrue(r.err.contains(dir), "\(what): \(r.err)")
            XCTAssertNotEqual(try Harness.run(["mountpoint", "-q", s.mnt], check: false).status, 0, what)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: planted), [], what)
        }
        try Harness.run(["rm", "-rf", dir])
        let r = try Harness.run(asNobody + [bin, "mount", img, s.mnt], check: false)
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertEqual(stat(dir, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o700)
        XCTAssertEqual(st.st_uid, 65534)
        XCTAssertEqual(try Harness.run(asNobody + [bin, "unmount", s.mnt], check: false).status, 0)
    }
}

extension Scratch {
    /// A fresh instance of a kernel file system (proc, sysfs) at `<scratch>/<type>`, unmounted
    /// when the scratch goes away.
    func kernelFileSystem(_ type: String) throws -> String {
        let dir = path(type)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Harness.run(["mount", "-t", type, type, dir])
        registerMediaMount(dir)
        return dir
    }
}

enum Paths {
    /// The raw file name rawmount shows for an image name (win.vmdk -> win.raw).
    static func rawName(_ image: String) -> String {
        if let dot = image.lastIndex(of: "."), dot != image.startIndex { return String(image[..<dot]) + ".raw" }
        return image + ".raw"
    }
}

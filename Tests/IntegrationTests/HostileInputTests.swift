import Foundation
import XCTest
import TestSupport

/// Images and names built as an attacker would: each test fails if the escape, hang or bomb
/// it reproduces comes back (issue 10).
final class HostileInputTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    /// The line of /proc/self/mountinfo for `mp`: (mount options, source, super options).
    func mountInfo(_ mp: String) throws -> (options: [String], source: String, superOptions: [String])? {
        let text = Files.readAll("/proc/self/mountinfo")
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
            // (list writes control characters out: a newline shows as \n.)
            let listed = img.replacingOccurrences(of: "\n", with: "\\n").replacingOccurrences(of: "\t", with: "\\t")
            XCTAssertTrue(try Harness.run([Harness.rawmount, "list"]).out.contains(listed), name)
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

    /// One sparse file named as two extents would take appends into each other's tables;
    /// two flat extents at separate offsets of one file are fine (and were refused as "in use").
    func testExtentsSharingAFileAreOnlyWrittenWhenTheyCannotOverlap() throws {
        let s = try Scratch()
        let split = s.path("s.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", split, "3G"])
        var text = try String(contentsOfFile: split, encoding: .utf8)
        text = text.replacingOccurrences(of: "s-s002.vmdk", with: "s-s001.vmdk")
        try text.write(toFile: split, atomically: false, encoding: .utf8)
        let r = try Harness.run([Harness.rawmount, "mount", split, s.mnt])
        XCTAssertTrue(r.err.contains("extent 1 and extent 2 are the same file"), r.err)
        XCTAssertEqual(try mountInfo(s.mnt)?.options.first, "ro")
        try Harness.run([Harness.rawmount, "unmount", s.mnt])
        let two = s.path("two.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", two, "2M"])
        text = try String(contentsOfFile: two, encoding: .utf8)
        text = text.replacingOccurrences(of: "RW 4096 FLAT \"two-flat.vmdk\" 0", with: "RW 2048 FLAT \"two-flat.vmdk\" 0\nRW 2048 FLAT \"two-flat.vmdk\" 2048")
        try text.write(toFile: two, atomically: false, encoding: .utf8)
        try s.mount(two)
        var rng = SeededRandom(seed: 3)
        let data = rng.bytes(2 << 20)
        try Files.pwrite(s.mnt + "/two.raw", data, at: 0)
        try s.unmount()
        XCTAssertEqual([UInt8](try s.qemuRaw(two)), data)
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

/// Crafted metadata: sizes at the edge of what 64 bits hold, tables every entry of which
/// aliases one table, chains that loop or run deep.
final class HostileMetadataTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    /// `python3 -c script args...` (the crafted images are a few lines of struct packing).
    func python(_ script: String, _ args: [String]) throws {
        try Harness.run(["python3", "-c", script] + args)
    }

    /// Runs `args` under a watchdog: a hang fails the test instead of stalling the suite.
    func bounded(_ args: [String], check: Bool = true) throws -> CommandResult {
        let r = try Harness.run(["timeout", "60"] + args, check: false)
        XCTAssertNotEqual(r.status, 124, "\(args): still running after 60 s")
        if check { XCTAssertEqual(r.status, 0, "\(args): \(r.err)") }
        return r
    }

    func testSizesPast2To63AreRefusedNotTrapped() throws {
        let s = try Scratch()
        let img = s.path("huge.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=1M", img, "1G"])
        try Harness.run(["truncate", "-s", "64M", img])
        for size: UInt64 in [1 << 63, UInt64.max - 511] {
            // 16 MiB clusters: a geometry whose maximum size overflows 64 bits.
            try python("""
            import struct,sys
            f=open(sys.argv[1],'r+b'); f.seek(4); f.write(struct.pack('<I',16<<20)); f.seek(40); f.write(struct.pack('<QQ',16<<20,int(sys.argv[2])))
            """, [img, String(size)])
            let info = try bounded([Harness.rawmount, "info", img], check: false)
            XCTAssertEqual(info.status, 1, "info \(size): \(info.err)")
            XCTAssertTrue(info.err.contains("huge.qed") && info.err.contains("2^63-1"), info.err)
            try s.assertMountRefused(["-r", img], mentions: ["huge.qed", "image_size"], "size \(size)")
        }
    }

    /// 131072 L1 entries of a 64 TiB qcow2 all naming one empty L2 table (1.3 MB file): stat,
    /// lseek and info answer in bounded time (conservatively where the walk is cut short).
    func testAliasedTablesDoNotMakeStatOrSeekUnbounded() throws {
        let s = try Scratch()
        let img = s.path("bomb.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64T"])
        try python("""
        import struct,sys
        f=open(sys.argv[1],'r+b'); h=f.read(48)
        n=struct.unpack('>I',h[36:40])[0]; l1=struct.unpack('>Q',h[40:48])[0]
        f.seek(0,2); end=(f.tell()+65535)//65536*65536; f.seek(end); f.write(b'\\0'*65536)
        f.seek(l1); f.write(struct.pack('>Q',end|1<<63)*n)
        """, [img])
        let vdi = s.path("bomb.vdi")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vdi", vdi, "2T"])
        try Harness.run(["qemu-io", "-f", "vdi", "-c", "write -P 7 0 4k", vdi])
        // Every block-map entry names block 0.
        try python("""
        import struct,sys
        f=open(sys.argv[1],'r+b'); f.seek(0x154); bmap=struct.unpack('<I',f.read(4))[0]
        f.seek(0x180); n=struct.unpack('<I',f.read(4))[0]
        f.seek(bmap); f.write(b'\\0'*(4*n))
        """, [vdi])
        for (image, raw) in [(img, "bomb.raw"), (vdi, "bomb.raw")] {
            let info = try bounded([Harness.rawmount, "info", image])
            XCTAssertTrue(info.out.contains("allocated:"), info.out)
            try s.mount(image, options: ["-r"])
            let file = s.mnt + "/" + raw
            let stat = try bounded(["stat", "-c", "%b %s", file])
            let parts = stat.out.split(separator: " ").compactMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            XCTAssertEqual(parts.count, 2)
            if parts.count == 2 { XCTAssertLessThanOrEqual(parts[0] * 512, parts[1], "st_blocks past the disk size") }
            let seek = try bounded(["python3", "-c", """
            import os,sys
            fd=os.open(sys.argv[1],os.O_RDONLY)
            for start in (0, 1<<40):
                for w in (os.SEEK_DATA, os.SEEK_HOLE):
                    try: print(os.lseek(fd,start,w))
                    except OSError as e: print('ENXIO' if e.errno==6 else e)
            """, file])
            let answers = seek.out.split(separator: "\n").map(String.init)
            XCTAssertEqual(answers.count, 4, seek.out + seek.err)
            XCTAssertTrue(answers.allSatisfy { $0 == "ENXIO" || UInt64($0) != nil }, seek.out)
            // Whatever SEEK_DATA says, reading there works and the disk reads as the oracle has it.
            _ = try bounded(["dd", "if=\(file)", "of=/dev/null", "bs=1M", "count=4", "status=none"])
            try s.unmount()
        }
    }

    func testChainsLoopByIdentityAndRunDeep() throws {
        let s = try Scratch()
        // A -> B -> A: a writable mount says the chain loops (it said "in use").
        let a = s.path("a.qed"), b = s.path("b.qcow2")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qcow2", b, "8M"])
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "8M"])
        try Harness.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", "a.qed", "-F", "qed", b])
        try s.assertMountRefused([a], mentions: ["loops"], "A -> B -> A, writable")
        // The same file under another name (a hard link) is the same image.
        try Harness.run(["ln", a, s.path("alias.qed")])
        try Harness.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", "alias.qed", "-F", "qed", b])
        try s.assertMountRefused(["-r", a], mentions: ["loops"], "hard-linked loop")
        // 200 levels (the limit was 16): each level holds one written cluster.
        var below = s.path("level0.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", below, "16M"])
        for i in 1...200 {
            let cur = s.path("level\(i).qed")
            try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-u", "-b", (below as NSString).lastPathComponent, "-F", "qed", cur, "16M"])
            if i % 50 == 0 { try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P \(i / 50) \(i * 65536) 64k", cur]) }
            below = cur
        }
        try s.mount(below, options: ["-r"])
        let raw = try Files.read(s.mnt + "/level200.raw")
        try s.unmount()
        XCTAssertTrue(raw == (try s.qemuRaw(below)), "a 200-deep chain reads as qemu-img reads it")
    }

    /// 16 MiB compressed grains let a 260 KB file make each reader hold ~48 MiB.
    func testCompressedGrainsAreCapped() throws {
        let s = try Scratch()
        let src = s.path("src.raw"), img = s.path("big-grain.vmdk")
        try Harness.run(["truncate", "-s", "4M", src])
        try Harness.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img])
        try Files.pwrite(img, le(32768, 8), at: 20)  // grainSize: 16 MiB
        try s.assertMountRefused(["-r", img], mentions: ["big-grain.vmdk", "grainSize", "2 MiB"], "16 MiB compressed grains")
    }

    func testVMDKParentMustBeVMDKAndCRLFDescriptorsRead() throws {
        let s = try Scratch()
        let child = s.path("child.vmdk"), base = s.path("base.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", base, "4M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 64k", base])
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "-b", "base.vmdk", "-F", "vmdk", child, "4M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x33 1M 64k", child])
        // The same descriptors with CRLF line ends, as Windows tools save them.
        for d in [child, base] {
            let text = try String(contentsOfFile: d, encoding: .utf8)
            try text.replacingOccurrences(of: "\n", with: "\r\n").write(toFile: d, atomically: false, encoding: .utf8)
        }
        try s.mount(child, options: ["-r"])
        XCTAssertTrue(try Files.read(s.mnt + "/child.raw") == (try s.qemuRaw(child)), "CRLF descriptors read as QEMU reads them")
        try s.unmount()
        // A parent hint naming any other file (here /etc/shadow's stand-in) is refused.
        let secret = s.path("secret.txt")
        try Data(repeating: 0x41, count: 4 << 20).write(to: URL(fileURLWithPath: secret))
        var text = try String(contentsOfFile: child, encoding: .utf8)
        text = text.replacingOccurrences(of: "base.vmdk", with: secret)
        try text.write(toFile: child, atomically: false, encoding: .utf8)
        try s.assertMountRefused(["-r", child], mentions: ["child.vmdk", "must be a VMDK"], "raw parent")
    }
}

/// Table entries that point into the image's own metadata, and checks of sparse giants.
final class MetadataOverlapTests: XCTestCase {
    override func setUpWithError() throws { try Harness.requireFuse() }

    func le32At(_ d: Data, _ o: Int) -> UInt64 { le(d, at: o, 4) }
    func le64At(_ d: Data, _ o: Int) -> UInt64 { le(d, at: o, 8) }

    /// pread/pwrite of 4 KiB at 0 on the mounted raw file: both must fail with EIO.
    func assertIOFails(_ raw: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let fd = open(raw, O_RDWR | 0o40000 /* O_DIRECT */)
        XCTAssertGreaterThanOrEqual(fd, 0, what, file: file, line: line)
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate(); close(fd) }
        memset(buf, 0x66, 4096)
        XCTAssertEqual(pread(fd, buf, 4096, 0), -1, "\(what): read", file: file, line: line)
        XCTAssertEqual(errno, EIO, what, file: file, line: line)
        XCTAssertEqual(pwrite(fd, buf, 4096, 0), -1, "\(what): write went through", file: file, line: line)
        XCTAssertEqual(errno, EIO, what, file: file, line: line)
    }

    func testVMDKGrainPointingAtItsDescriptorIsRefused() throws {
        let s = try Scratch()
        let img = s.path("d.vmdk")
        try Harness.run(["qemu-img", "create", "-q", "-f", "vmdk", img, "8M"])
        try Harness.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 64k", img])
        var bytes = try Files.read(img)
        let descStart = Int(le64At(bytes, 28)) * 512, descSize = Int(le64At(bytes, 36)) * 512
        let gd = Int(le64At(bytes, 56)) * 512
        let gt = Int(le32At(bytes, gd)) * 512
        bytes.replaceSubrange(gt..<(gt + 4), with: le(1, 4))       // grain 0 -> sector 1, the descriptor
        try bytes.write(to: URL(fileURLWithPath: img))
        let descriptor = bytes.subdata(in: descStart..<(descStart + descSize))
        try s.mount(img)
        assertIOFails(s.mnt + "/d.raw", "grain in the descriptor")
        try s.unmount()
        XCTAssertEqual(try Files.read(img).subdata(in: descStart..<(descStart + descSize)), descriptor, "the descriptor was rewritten")
        let check = try Harness.run([Harness.rawmount, "check", img], check: false)
        XCTAssertEqual(check.status, 2, check.out + check.err)
        XCTAssertTrue((check.out + check.err).contains("lies in"), check.out + check.err)
    }

    func testQEDDataClusterInsideTheL1IsRefused() throws {
        let s = try Scratch()
        let img = s.path("q.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", img, "8M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 4k", img])
        var bytes = try Files.read(img)
        let l1 = Int(le64At(bytes, 40))
        let l2 = Int(le64At(bytes, l1))
        bytes.replaceSubrange(l2..<(l2 + 8), with: le(UInt64(l1), 8))  // data cluster 0 -> the L1 itself
        try bytes.write(to: URL(fileURLWithPath: img))
        let l1Before = bytes.subdata(in: l1..<(l1 + 8192))
        try s.mount(img)
        assertIOFails(s.mnt + "/q.raw", "data cluster in the L1")
        try s.unmount()
        XCTAssertEqual(try Files.read(img).subdata(in: l1..<(l1 + 8192)), l1Before, "the L1 was rewritten")
        let check = try Harness.run([Harness.rawmount, "check", img], check: false)
        XCTAssertEqual(check.status, 2, check.out + check.err)
        let qemu = try Harness.run(["qemu-img", "check", img], check: false)
        XCTAssertNotEqual(qemu.status, 0, "the oracle calls it clean too? \(qemu.out)")
    }

    /// A NEED_CHECK QED in an 8 TiB sparse file with 4 KiB clusters: the check (and the
    /// writable open that repairs) uses memory for the clusters referenced, not the file.
    func testQEDCheckOfASparseGiantStaysSmall() throws {
        let s = try Scratch()
        let img = s.path("giant.qed")
        try Harness.run(["qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096", img, "64M"])
        try Harness.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 64k", img])
        try Harness.run(["truncate", "-s", "8T", img])
        try Files.pwrite(img, [0x02], at: 16)  // NEED_CHECK
        let measure = """
        import resource,subprocess,sys
        r=subprocess.run(sys.argv[1:],capture_output=True,text=True)
        print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        sys.stderr.write(r.stdout+r.stderr)
        """
        let r = try Harness.run(["timeout", "120", "python3", "-c", measure, Harness.rawmount, "check", img], check: false)
        let fields = r.out.split(separator: " ").compactMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        XCTAssertEqual(fields.count, 2, r.out + r.err)
        guard fields.count == 2 else { return }
        XCTAssertEqual(fields[0], 3, "leaks only: \(r.err)")  // the sparse tail counts as leaked clusters
        XCTAssertLessThan(fields[1], 150 * 1024, "check used \(fields[1]) KiB")
        try s.mount(img)
        try s.unmount()
        let fd = open(img, O_RDONLY)
        var features: UInt8 = 0xFF
        XCTAssertEqual(pread(fd, &features, 1, 16), 1)
        close(fd)
        XCTAssertEqual(features, 0, "NEED_CHECK cleared by the repairing open")
    }
}

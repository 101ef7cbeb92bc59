import CFuse3
import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

// libfuse3 low-level callbacks. Each answers on the libfuse worker thread that called it;
// the filesystem object arrives through the session's userdata.

@inline(__always)
private func filesystem(_ req: fuse_req_t?) -> FuseFilesystem {
    Unmanaged<FuseFilesystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
}

/// Answers a failed request with the error's errno and records it in the server log.
private func reply(_ req: fuse_req_t?, _ fs: FuseFilesystem, _ request: @autoclosure () -> String, error: Error) {
    let code = (error as? BlockError)?.errnoValue ?? (error as? WriteBehindFailure)?.errnoValue ?? EIO
    if let log = fs.log { log.record("\(request()): \(String(cString: strerror(code))): \(error)") }
    fuse_reply_err(req, code)
}

private let attrTimeout = 1.0

private func replyEntry(_ req: fuse_req_t?, _ fs: FuseFilesystem, _ ino: UInt64) {
    guard let st = fs.attributes(ino) else { fuse_reply_err(req, ENOENT); return }
    var e = fuse_entry_param()
    e.ino = ino
    e.generation = 1
    e.attr = st
    e.attr_timeout = attrTimeout
    e.entry_timeout = attrTimeout
    fuse_reply_entry(req, &e)
}

func makeOperations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()
    setSessionOperations(&ops)
    setAttributesOperations(&ops)
    setHandlesOperations(&ops)
    setDataOperations(&ops)
    setDirectoryOperations(&ops)
    return ops
}

/// The callbacks for the connection's options.
private func setSessionOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.`init` = { userdata, conn in
        guard let conn else { return }
        // O_TRUNC arrives in open flags instead of as a size-0 setattr, so `dd of=` without
        // conv=notrunc leaves the disk intact.
        if conn.pointee.capable & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 {
            conn.pointee.want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
        }
        conn.pointee.want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
        conn.pointee.max_background = 64
        conn.pointee.congestion_threshold = 48
        if let userdata, let maxRead = Unmanaged<FuseFilesystem>.fromOpaque(userdata).takeUnretainedValue().maxRead.withLock({ $0 }) {
            conn.pointee.max_read = maxRead
        }
    }
}

/// The callbacks for names and attributes: the root directory's entries, stat, statfs.
private func setAttributesOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.lookup = { req, parent, name in
        let fs = filesystem(req)
        guard parent == FuseFilesystem.rootInode, let name, let ino = fs.inode(named: String(cString: name)) else {
            fuse_reply_err(req, ENOENT); return
        }
        replyEntry(req, fs, ino)
    }

    ops.getattr = { req, ino, _ in
        guard var st = filesystem(req).attributes(ino) else { fuse_reply_err(req, ENOENT); return }
        fuse_reply_attr(req, &st, attrTimeout)
    }

    ops.setattr = { req, ino, attr, toSet, _ in
        let fs = filesystem(req)
        guard var st = fs.attributes(ino) else { fuse_reply_err(req, ENOENT); return }
        if toSet & FUSE_SET_ATTR_SIZE != 0, let attr {
            // The disk's size is the image's virtual size; only "no change" is accepted.
            if attr.pointee.st_size != st.st_size { fuse_reply_err(req, EPERM); return }
            if fs.file(ino)?.readOnly ?? true { fuse_reply_err(req, EROFS); return }
        }
        // Mode, owner and time changes are accepted and not stored.
        fuse_reply_attr(req, &st, attrTimeout)
    }

    ops.statfs = { req, _ in
        let fs = filesystem(req)
        var sv = statvfs()
        let total = fs.files.reduce(UInt64(0)) { $0 + $1.size }
        sv.f_bsize = 4096
        sv.f_frsize = 4096
        sv.f_blocks = fsblkcnt_t((total + 4095) / 4096)
        sv.f_bfree = 0
        sv.f_bavail = 0
        sv.f_files = fsfilcnt_t(fs.files.count + 1)
        sv.f_namemax = 255
        fuse_reply_statfs(req, &sv)
    }
}

/// The callbacks for opening and closing a file, and making its changes durable.
private func setHandlesOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.open = { req, ino, fi in
        let fs = filesystem(req)
        guard let file = fs.file(ino), let fi else {
            fuse_reply_err(req, fs.rootIsFile ? ENOENT : EISDIR); return
        }
        let flags = rm_fi_flags(fi)
        if (flags & O_ACCMODE) != O_RDONLY && file.readOnly { fuse_reply_err(req, EROFS); return }
        // A file that cannot change takes O_DIRECT through the kernel's own direct I/O path
        // (still past the page cache), which sends a large read's max_read parts at once;
        // direct_io would send them one after another. Writable files keep direct_io: the
        // other path takes the inode lock exclusively for each write.
        if (flags & rm_O_DIRECT != 0 && !file.readOnly) || file.directIO { rm_fi_set_direct_io(fi, 1) }
        // FLUSH (on close) carries only this handle, not the open flags: keep them in it.
        fi.pointee.fh = UInt64(UInt32(bitPattern: flags))
        fuse_reply_open(req, fi)
    }

    ops.flush = { req, ino, fi in
        let fs = filesystem(req)
        guard let file = fs.file(ino) else { fuse_reply_err(req, 0); return }
        if !file.readOnly, let fi, Int32(truncatingIfNeeded: fi.pointee.fh) & O_ACCMODE != O_RDONLY {
            do {
                try file.writeBehind?.settle()
                try file.device.flush()
            } catch { reply(req, fs, "flush", error: error); return }
        }
        fuse_reply_err(req, 0)
    }

    ops.release = { req, _, _ in fuse_reply_err(req, 0) }

    ops.fsync = { req, ino, _, _ in
        let fs = filesystem(req)
        guard let file = fs.file(ino) else { fuse_reply_err(req, 0); return }
        do {
            try file.writeBehind?.settle()
            try file.device.flush()
            fuse_reply_err(req, 0)
        } catch { reply(req, fs, "fsync", error: error) }
    }
}

/// Answers a read from lent memory (`BlockDevice.lend`): the kernel copies it straight into
/// the reader's pages. If it cannot (an image file shrank under its mapping), the kernel has
/// already failed the read with EIO; the log says why.
private func replyLent(_ req: fuse_req_t?, _ fs: FuseFilesystem, _ regions: [UnsafeRawBufferPointer], _ n: Int, _ off: off_t) {
    let r = withUnsafeTemporaryAllocation(of: iovec.self, capacity: regions.count) { iov in
        for (k, b) in regions.enumerated() { iov[k] = iovec(iov_base: UnsafeMutableRawPointer(mutating: b.baseAddress), iov_len: b.count) }
        return fuse_reply_iov(req, iov.baseAddress, Int32(regions.count))
    }
    if r != 0, let log = fs.log {
        log.record("read \(n) bytes at \(off): \(String(cString: strerror(EIO))): the kernel could not copy the image's mapped bytes (\(String(cString: strerror(-r))): an image file shrank under the mount?)")
    }
}

/// The callbacks for guest bytes: reads, writes, zeroing and discards, SEEK_DATA/SEEK_HOLE.
private func setDataOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.read = { req, ino, size, off, _ in
        let fs = filesystem(req)
        guard let file = fs.file(ino) else { fuse_reply_err(req, EISDIR); return }
        let disk = file.size
        guard off >= 0, UInt64(off) < disk else { fuse_reply_buf(req, nil, 0); return }
        let n = Int(min(UInt64(size), disk - UInt64(off)))
        file.pendingWrites?.drain()
        if file.readOnly, file.device.lend(at: file.start + UInt64(off), count: n, { replyLent(req, fs, $0, n, off) }) { return }
        let buf = ThreadBuffer.get(n)
        do {
            try file.device.read(into: buf, at: file.start + UInt64(off))
            fuse_reply_buf(req, buf.baseAddress!.assumingMemoryBound(to: CChar.self), n)
        } catch {
            reply(req, fs, "read \(n) bytes at \(off)", error: error)
        }
    }

    ops.write = { req, ino, buf, size, off, fi in
        let fs = filesystem(req)
        guard let file = fs.file(ino), let buf else { fuse_reply_err(req, EISDIR); return }
        if file.readOnly { fuse_reply_err(req, EROFS); return }
        let disk = file.size
        guard off >= 0, UInt64(off) < disk else { fuse_reply_err(req, ENOSPC); return }
        // Like a block device: a write running past the end is cut short there.
        let n = Int(min(UInt64(size), disk - UInt64(off)))
        let data = UnsafeRawBufferPointer(start: buf, count: n)
        let at = file.start + UInt64(off)
        // Before the reply: once the writer's call returns, the disk file must not show the
        // old bytes from its page cache.
        let dropDiskCache = { if file.isPartition { fs.dropDiskCache(at: at, length: UInt64(n)) } }
        // O_SYNC/O_DSYNC: the kernel leaves these to the server on direct-I/O files; the
        // write completes once it is durable in the image.
        let synchronous = rm_fi_flags(fi) & (O_DSYNC | O_SYNC) != 0
        file.noteChange()
        defer { file.noteChangeDone() }
        do {
            if let behind = file.writeBehind {
                try behind.reportFailure()
                try file.device.checkWrite(data, at: at)  // refused before it is acknowledged
                if !synchronous && behind.accept(data, at: at) { dropDiskCache(); fuse_reply_write(req, n); return }
                behind.drain()
            }
            try file.device.write(data, at: at)
            if synchronous { try file.device.flush() }
            dropDiskCache()
            fuse_reply_write(req, n)
        } catch {
            reply(req, fs, "write \(n) bytes at \(off)", error: error)
        }
    }

    ops.fallocate = { req, ino, mode, offset, length, _ in
        let fs = filesystem(req)
        guard let file = fs.file(ino) else { fuse_reply_err(req, EISDIR); return }
        if file.readOnly { fuse_reply_err(req, EROFS); return }
        guard offset >= 0, length > 0 else { fuse_reply_err(req, EINVAL); return }
        let disk = file.size
        let start = UInt64(offset)
        let end = start + UInt64(length)
        let punch = mode & rm_FALLOC_FL_PUNCH_HOLE != 0
        let zero = mode & rm_FALLOC_FL_ZERO_RANGE != 0
        let known = rm_FALLOC_FL_PUNCH_HOLE | rm_FALLOC_FL_ZERO_RANGE | rm_FALLOC_FL_KEEP_SIZE
        guard mode & ~known == 0, !(punch && zero) else { fuse_reply_err(req, EOPNOTSUPP); return }
        if punch && mode & rm_FALLOC_FL_KEEP_SIZE == 0 { fuse_reply_err(req, EOPNOTSUPP); return }
        if !punch && !zero {
            // Preallocation: every byte of the disk already exists; growing is not possible.
            fuse_reply_err(req, end <= disk ? 0 : EOPNOTSUPP); return
        }
        // Zeroing never changes the size: clip to the disk.
        guard start < disk else { fuse_reply_err(req, mode & rm_FALLOC_FL_KEEP_SIZE != 0 ? 0 : EOPNOTSUPP); return }
        if end > disk && mode & rm_FALLOC_FL_KEEP_SIZE == 0 { fuse_reply_err(req, EOPNOTSUPP); return }
        file.noteChange()
        defer { file.noteChangeDone() }
        do {
            try file.writeBehind?.settle()
            try file.device.zero(at: file.start + start, length: min(end, disk) - start, deallocate: punch)
            if file.isPartition { fs.dropDiskCache(at: file.start + start, length: min(end, disk) - start) }
            fuse_reply_err(req, 0)
        } catch {
            reply(req, fs, "fallocate mode \(mode) \(length) bytes at \(offset)", error: error)
        }
    }

    ops.lseek = { req, ino, off, whence, _ in
        let fs = filesystem(req)
        guard let file = fs.file(ino) else { fuse_reply_err(req, EISDIR); return }
        guard whence == rm_SEEK_DATA || whence == rm_SEEK_HOLE else { fuse_reply_err(req, EINVAL); return }
        guard off >= 0 else { fuse_reply_err(req, ENXIO); return }
        file.pendingWrites?.drain()
        let data = whence == rm_SEEK_DATA
        guard UInt64(off) < file.size else { fuse_reply_err(req, ENXIO); return }
        do {
            // A partition's end is its own: data past it is not this file's, and a hole
            // that runs on past it ends there (as a file's end is an implicit hole).
            let end = file.start + file.size
            if let pos = try file.device.seek(from: file.start + UInt64(off), data: data, end: end), !(data && pos >= end) {
                fuse_reply_lseek(req, off_t(min(pos, end) - file.start))
            } else {
                fuse_reply_err(req, ENXIO)
            }
        } catch {
            reply(req, fs, "lseek from \(off) whence \(whence)", error: error)
        }
    }
}

/// The callbacks for listing the root directory.
private func setDirectoryOperations(_ ops: inout fuse_lowlevel_ops) {
    ops.opendir = { req, ino, fi in
        let fs = filesystem(req)
        guard ino == FuseFilesystem.rootInode, !fs.rootIsFile else { fuse_reply_err(req, ENOTDIR); return }
        fuse_reply_open(req, fi)
    }

    ops.readdir = { req, ino, size, off, _ in
        let fs = filesystem(req)
        guard ino == FuseFilesystem.rootInode, !fs.rootIsFile else { fuse_reply_err(req, ENOTDIR); return }
        var names: [(String, UInt64, mode_t)] = [(".", 1, S_IFDIR), ("..", 1, S_IFDIR)]
        for (i, f) in fs.files.enumerated() { names.append((f.name, UInt64(i + 2), S_IFREG)) }
        let buf = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
        defer { buf.deallocate() }
        var used = 0
        var index = Int(off)
        while index < names.count {
            var st = stat()
            st.st_ino = __ino_t(names[index].1)
            st.st_mode = names[index].2
            let need = fuse_add_direntry(req, buf + used, size - used, names[index].0, &st, off_t(index + 1))
            if need > size - used { break }
            used += need
            index += 1
        }
        fuse_reply_buf(req, buf, used)
    }

    ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
}

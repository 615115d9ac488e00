defmodule Capsid.ClusterTest do
  # Peer nodes over loopback distribution (OTP's :peer); run in `make test`,
  # `mix test --exclude cluster` skips them.
  use ExUnit.Case, async: false

  import Capsid.TestHelpers, only: [wait_until: 2]

  alias Capsid.{Error, TestCluster, Trap}

  @moduletag :cluster
  @moduletag timeout: 180_000

  @v1 Capsid.Guests.path(:greeter_v1)
  @v2 Capsid.Guests.path(:greeter_v2)
  @bad Capsid.Guests.path(:greeter_bad)
  @faulty Capsid.Guests.path(:faulty)

  doctest Capsid.Cluster

  setup_all do
    # The peers are linked to this process (the module's setup_all one).
    peers = for _ <- 1..3, do: TestCluster.start_peer!()

    # :global notes every node that goes away ("requested disconnect ... to
    # prevent overlapping partitions"): expected here.
    on_exit(fn ->
      ExUnit.CaptureLog.capture_log(fn ->
        for {peer, _} <- peers do
          try do
            :peer.stop(peer)
          catch
            :exit, _ -> :already_stopped
          end
        end

        Process.sleep(200)
      end)
    end)

    %{nodes: Enum.map(peers, &elem(&1, 1))}
  end

  setup context do
    name = {:cluster, context.line, System.unique_integer([:positive])}
    on_exit(fn -> Capsid.undeploy(name) end)
    %{name: name}
  end

  defp versions_by_node(name) do
    {:ok, %{nodes: nodes}} = Capsid.versions(name)
    Map.new(nodes, fn {n, v} -> {n, v.hash} end)
  end

  test "deploy on three nodes; call from each and from a node without instances",
       %{nodes: nodes, name: name} do
    assert {:ok, info} = Capsid.deploy(name, @v1, nodes: nodes, size: 1)
    assert Map.keys(info.nodes) == Enum.sort(nodes)
    assert info.lost == []
    assert Enum.all?(Map.values(info.nodes), &(&1.version == 1))
    assert Enum.all?(Map.values(info.loaded), &(&1 in [:hit, :miss]))

    # Every node knows who holds it, this one included, and at which version.
    assert Capsid.Cluster.nodes(name) == Enum.sort(nodes)
    assert Capsid.Cluster.serving(name) == Map.new(nodes, &{&1, info.current.hash})

    for n <- nodes do
      # (Each node learns of the others through its own :pg scope.)
      wait_until(fn -> :erpc.call(n, Capsid.Cluster, :nodes, [name]) == Enum.sort(nodes) end, 5_000)
      assert TestCluster.call(n, name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}
    end

    # This node holds no instance: the calls go to the others, spread.
    refute node() in Capsid.Cluster.nodes(name)

    for _ <- 1..60 do
      assert Capsid.call(name, "hello", ["Ada"]) == {:ok, "Hello, Ada!"}
    end

    served = for n <- nodes, do: :erpc.call(n, TestCluster, :served, [name])

    # Each node got some of this node's 60 calls (plus its own one).
    assert Enum.all?(served, &(&1 > 1)), "calls per node: #{inspect(served)}"

    assert {:ok, %{nodes: versions}} = Capsid.versions(name)
    assert map_size(versions) == 3
  end

  test "an upgrade under a stream of callers on every node fails no call; rollback everywhere",
       %{nodes: nodes, name: name} do
    test = self()
    id = make_ref()

    for e <- [:deploy, :rollback] do
      :telemetry.attach(
        {id, e},
        [:capsid, :cluster, e],
        fn ev, m, meta, _ ->
          send(test, {ev, m, meta})
        end,
        nil
      )
    end

    on_exit(fn -> for e <- [:deploy, :rollback], do: :telemetry.detach({id, e}) end)

    {:ok, %{current: %{hash: h1}}} = Capsid.deploy(name, @v1, nodes: nodes, size: 2)
    assert_receive {[:capsid, :cluster, :deploy], %{duration: d}, %{name: ^name, result: :ok}}
    assert d > 0

    # Callers on every peer and on this node (which holds no instance).
    streams = for n <- [node() | nodes], do: TestCluster.stream(n, name, "version")
    Process.sleep(300)

    assert {:ok, info} = Capsid.deploy(name, @v2, nodes: nodes)
    h2 = info.current.hash
    assert h2 != h1
    # Each node got the bytes (or had the compiled artifact cached).
    assert Enum.all?(Map.values(info.loaded), &(&1 in [:hit, :miss]))

    # Once deploy returns, every node serves the new version, and this node
    # knows it from the membership alone.
    for n <- nodes, do: assert(TestCluster.call(n, name, "version", []) == {:ok, 2})
    assert versions_by_node(name) == Map.new(nodes, &{&1, h2})
    assert Capsid.Cluster.serving(name) == Map.new(nodes, &{&1, h2})

    Process.sleep(300)
    assert {:ok, info} = Capsid.rollback(name)
    assert_receive {[:capsid, :cluster, :rollback], _, %{name: ^name, result: :ok}}
    assert info.loaded == Map.new(nodes, &{&1, :held})
    for n <- nodes, do: assert(TestCluster.call(n, name, "version", []) == {:ok, 1})
    assert versions_by_node(name) == Map.new(nodes, &{&1, h1})
    Process.sleep(300)

    for s <- streams do
      {counts, failures} = TestCluster.stop(s)
      assert failures == [], "failed calls: #{inspect(Enum.take(failures, 3))}"
      # Each stream saw both versions.
      assert Map.keys(counts) |> Enum.sort() == [1, 2], inspect(counts)
    end

    # The version rolled back from is held on every node: no bytes travel.
    assert {:ok, %{loaded: loaded}} = Capsid.deploy(name, @v2, nodes: nodes)
    assert loaded == Map.new(nodes, &{&1, :held})
  end

  test "a node that cannot load the new version fails the whole upgrade; none switches",
       %{nodes: [n1 | _] = nodes, name: name} do
    {:ok, %{current: %{hash: h1}}} = Capsid.deploy(name, @v1, nodes: nodes, size: 1)

    # n1 is configured with a lower component size limit than v2 needs.
    :ok = :erpc.call(n1, Application, :put_env, [:capsid, :max_component_bytes, 1000])
    on_exit(fn -> :erpc.call(n1, Application, :delete_env, [:capsid, :max_component_bytes]) end)

    assert {:error, %Error{kind: :resource_limit, message: message}} =
             Capsid.deploy(name, @v2, nodes: nodes)

    assert message =~ "#{n1}:"
    assert message =~ "no node switched"
    assert versions_by_node(name) == Map.new(nodes, &{&1, h1})
    for n <- nodes, do: assert(TestCluster.call(n, name, "version", []) == {:ok, 1})

    # Nothing prepared is left running: the next upgrade goes through.
    :ok = :erpc.call(n1, Application, :delete_env, [:capsid, :max_component_bytes])
    assert {:ok, %{nodes: after_upgrade}} = Capsid.deploy(name, @v2, nodes: nodes)
    assert Enum.all?(Map.values(after_upgrade), &(&1.version == 2))
  end

  test "an import that one node cannot provide fails the deploy on every node",
       %{nodes: [n1 | _], name: name} do
    # A module that exists on this node only.
    mod = :"Elixir.Capsid.ClusterOnlyHere#{System.unique_integer([:positive])}"
    Code.compile_string("defmodule #{inspect(mod)} do\n def hook(x), do: x\nend")
    imports = %{"hook" => {mod, :hook}}

    assert {:error, %Error{kind: :link, message: message}} =
             Capsid.deploy(name, @faulty, nodes: [node(), n1], imports: imports, size: 1)

    assert message =~ "#{n1}:"
    refute message =~ "#{node()}:"
    assert message =~ "not an exported function"
    # The deployment this node had prepared was stopped with the rest.
    assert Capsid.Cluster.nodes(name) == []
    # (The stdlib Registry forgets a stopped process asynchronously.)
    wait_until(fn -> Capsid.Deployment.whereis(name) == nil end, 5_000)
  end

  test "an incompatible version is refused once, before any node switches",
       %{nodes: nodes, name: name} do
    {:ok, %{current: %{hash: h1}}} = Capsid.deploy(name, @v1, nodes: nodes, size: 1)

    assert {:error, %Error{kind: :incompatible, message: message}} =
             Capsid.deploy(name, @bad, nodes: nodes)

    # Checked once: one node named, not three.
    assert length(String.split(message, "version changed type")) == 2, message
    assert versions_by_node(name) == Map.new(nodes, &{&1, h1})
  end

  test "two cluster-wide deploys of one name at once run one after the other",
       %{nodes: nodes, name: name} do
    {:ok, _} = Capsid.deploy(name, @v1, nodes: nodes, size: 1)

    results =
      [@v2, @v1, @v2, @v1]
      |> Enum.map(fn v -> Task.async(fn -> Capsid.deploy(name, v, nodes: nodes) end) end)
      |> Enum.map(&Task.await(&1, 60_000))

    # None was turned away as busy: the :global lock serialized them.
    assert Enum.all?(results, &match?({:ok, _}, &1)), inspect(results)
    # Every node ended on the same version.
    assert versions_by_node(name) |> Map.values() |> Enum.uniq() |> length() == 1
  end

  test "bad input to a cluster-wide deploy is refused in the caller", %{nodes: nodes, name: name} do
    # Read as Component.load reads: a device is not read (it would never end).
    assert {:error, %Error{kind: :file_error}} = Capsid.deploy(name, "/dev/zero", nodes: nodes)

    assert {:error, %Error{kind: :invalid_component}} =
             Capsid.deploy(name, <<1, 2, 3>>, nodes: nodes)

    assert_raise ArgumentError, ~r/:nodes/, fn -> Capsid.deploy(name, @v1, nodes: []) end
    assert_raise ArgumentError, ~r/:nodes/, fn -> Capsid.deploy(name, @v1, nodes: ["a@b"]) end

    assert_raise ArgumentError, ~r/:timeout/, fn ->
      Capsid.deploy(name, @v1, nodes: nodes, timeout: -1)
    end

    assert_raise ArgumentError, ~r/watch/, fn ->
      Capsid.deploy(name, @v1, nodes: nodes, watch: true)
    end

    assert Capsid.Cluster.nodes(name) == []
  end

  test "a node without Capsid's code fails the deploy promptly; the others are left as they were",
       %{nodes: [n1 | _], name: name} do
    {:ok, _peer, bare} =
      :peer.start_link(%{
        name: :"bare_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true
      })

    {:ok, _} = Capsid.deploy(name, @v1, nodes: [n1], size: 1)
    task = Task.async(fn -> Capsid.deploy(name, @v2, nodes: [n1, bare]) end)

    assert {:ok, {:error, %Error{kind: :instance_down, message: message}}} =
             Task.yield(task, 30_000)

    assert message =~ "#{bare}: "
    assert message =~ "Capsid's code is not loaded there"
    assert versions_by_node(name) |> Map.keys() == [n1]
    assert TestCluster.call(n1, name, "version", []) == {:ok, 1}
  end

  test "a node that is not reachable fails the deploy before anything starts",
       %{nodes: nodes, name: name} do
    assert {:error, %Error{kind: :instance_down, message: message}} =
             Capsid.deploy(name, @v1, nodes: [:"nobody@127.0.0.1" | nodes])

    assert message =~ "nobody@127.0.0.1: cannot be reached"
    assert Capsid.Cluster.nodes(name) == []
  end

  @tag capture_log: true
  test "a node that goes down takes its instances; calls go to the nodes left; a node joins",
       %{nodes: [n1 | _], name: name} do
    {peer, doomed} = TestCluster.start_peer!()
    {:ok, _} = Capsid.deploy(name, @v1, nodes: [n1, doomed], size: 1)
    assert Capsid.Cluster.nodes(name) == Enum.sort([n1, doomed])

    stream = TestCluster.stream(node(), name, "version")
    Process.sleep(300)
    :peer.stop(peer)
    Process.sleep(300)
    {counts, failures} = TestCluster.stop(stream)
    assert failures == [], "failed calls: #{inspect(Enum.take(failures, 3))}"
    assert counts[1] > 0

    wait_until(fn -> Capsid.Cluster.nodes(name) == [n1] end, 5_000)
    assert {:ok, %{nodes: nodes}} = Capsid.versions(name)
    assert Map.keys(nodes) == [n1]

    # This node joins: n1 keeps its instances (same component and options).
    {:ok, info} = Capsid.deploy(name, @v1, nodes: [n1, node()], size: 1)
    assert info.loaded[n1] == :held
    assert info.nodes[n1].version == 1
    assert Capsid.Cluster.nodes(name) == Enum.sort([n1, node()])
    assert Capsid.call(name, "version", []) == {:ok, 1}

    # Undeploy stops it on every node.
    assert Capsid.undeploy(name) == :ok
    wait_until(fn -> Capsid.Cluster.nodes(name) == [] end, 5_000)
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(name, "version", [])
  end

  test "remote calls keep the result and error shapes and the caller's timeout",
       %{nodes: [n1 | _], name: name} do
    imports = %{"hook" => &TestCluster.hook/1}
    {:ok, _} = Capsid.deploy(name, @faulty, nodes: [n1], size: 1, imports: imports, timeout: 1_000)

    test = self()
    id = make_ref()

    :telemetry.attach(
      id,
      [:capsid, :cluster, :call],
      fn ev, m, meta, _ ->
        send(test, {ev, m, meta})
      end,
      nil
    )

    on_exit(fn -> :telemetry.detach(id) end)

    assert Capsid.call(name, "call-hook", [41]) == {:ok, 42}

    assert_receive {[:capsid, :cluster, :call], %{duration: _},
                    %{node: ^n1, function: "call-hook", result: :ok}}

    {:error, %Error{kind: :bad_argument, message: remote_message}} = Capsid.call(name, "ok", ["x"])

    {:error, %Error{kind: :bad_argument, message: local_message}} =
      TestCluster.call(n1, name, "ok", ["x"])

    assert remote_message == local_message
    assert {:error, %Error{kind: :unknown_function}} = Capsid.call(name, "nope", [])
    assert {:error, %Trap{kind: :unreachable}} = Capsid.call(name, "hit-unreachable", [])

    # The remote instance's own timeout stops the guest there.
    assert {:error, %Trap{kind: :timeout}} = Capsid.call(name, "spin", [])

    # The caller's timeout bounds the whole call, also while the remote
    # instance is busy with another call.
    busy = Task.async(fn -> TestCluster.call(n1, name, "spin", []) end)
    Process.sleep(100)
    t0 = System.monotonic_time(:millisecond)

    assert {:error, %Trap{kind: :timeout, message: message}} =
             Capsid.call(name, "ok", [1], timeout: 100)

    elapsed = System.monotonic_time(:millisecond) - t0
    assert message =~ "no answer from node #{n1}"
    assert elapsed < 800, "took #{elapsed} ms"
    assert {:error, %Trap{kind: :timeout}} = Task.await(busy, 10_000)

    # Bad options are refused here, before anything is sent.
    assert_raise ArgumentError, ~r/timeout/, fn -> Capsid.call(name, "ok", [1], timeout: -1) end

    # A pid of an instance on another node is a target too.
    [member] = :erpc.call(n1, TestCluster, :members, [name])
    assert node(member) == n1
    assert Capsid.call(member, "ok", [1]) == {:ok, 2}
    assert Capsid.call!(member, "ok", [2]) == 3
  end

  # A node that froze keeps its connection until net_ticktime notices
  # (about a minute): the caller must not wait for that, with or without a
  # :timeout of its own.
  test "a call to a frozen node returns within what the remote limits allow, without :timeout",
       %{name: name} do
    {_peer, frozen} = TestCluster.start_peer!()
    imports = %{"hook" => &TestCluster.hook/1}

    {:ok, _} =
      Capsid.deploy(name, @faulty,
        nodes: [frozen],
        size: 1,
        imports: imports,
        timeout: 1_000,
        queue_timeout: 200
      )

    assert Capsid.call(name, "ok", [1]) == {:ok, 2}
    os_pid = :erpc.call(frozen, :os, :getpid, [])
    signal = fn sig -> {_, 0} = System.cmd("kill", ["-#{sig}", to_string(os_pid)]) end
    on_exit(fn -> System.cmd("kill", ["-CONT", to_string(os_pid)]) end)

    timed = fn fun ->
      t0 = System.monotonic_time(:millisecond)
      result = fun.()
      {result, System.monotonic_time(:millisecond) - t0}
    end

    # Frozen before the call: the node never takes it.
    signal.("STOP")
    {result, elapsed} = timed.(fn -> Capsid.call(name, "ok", [1]) end)
    signal.("CONT")
    assert {:error, %Error{kind: :timeout, message: message}} = result
    assert message =~ "#{frozen}"
    # 2 s for the node to take the call, and some slack.
    assert elapsed < 4_000, "took #{elapsed} ms"

    # Frozen during the call: the node said its instance allows 1_200 ms
    # (timeout plus queue_timeout); the caller waits that plus 2 s.
    task = Task.async(fn -> timed.(fn -> Capsid.call(name, "spin", []) end) end)
    Process.sleep(300)
    signal.("STOP")
    {result, elapsed} = Task.await(task, 120_000)
    signal.("CONT")
    assert {:error, %Error{kind: :timeout, message: message}} = result
    assert message =~ "#{frozen}"
    assert message =~ "1200 ms"
    assert elapsed in 3_000..5_500, "took #{elapsed} ms"

    # Awake again, it serves.
    wait_until(fn -> Capsid.call(name, "ok", [1]) == {:ok, 2} end, 10_000)
  end

  test "a caller killed mid-call cancels its remote call at once", %{nodes: [n1 | _], name: name} do
    imports = %{"hook" => &TestCluster.hook/1}
    {:ok, _} = Capsid.deploy(name, @faulty, nodes: [n1], size: 1, imports: imports, timeout: 20_000)
    [member] = :erpc.call(n1, TestCluster, :members, [name])

    caller = spawn(fn -> Capsid.call(name, "spin", []) end)
    Process.sleep(300)
    Process.exit(caller, :kill)

    # The instance is free again long before the guest's 20 s timeout.
    assert Capsid.call(name, "ok", [1], timeout: 2_000, queue_timeout: 2_000) == {:ok, 2}
    assert %{traps: %{cancelled: 1}} = :erpc.call(n1, Capsid.Instance, :info, [member])
  end

  test "a node with Capsid's code that has not started it yet can be deployed to",
       %{name: name} do
    {_peer, fresh} = TestCluster.start_peer!([], false)
    refute List.keymember?(:erpc.call(fresh, Application, :started_applications, []), :capsid, 0)
    {:ok, %{nodes: nodes}} = Capsid.deploy(name, @v1, nodes: [fresh], size: 1)
    assert Map.keys(nodes) == [fresh]
    assert Capsid.call(name, "version", []) == {:ok, 1}
  end

  test "remote calls: a huge argument and result, a large name term, many callers at once",
       %{nodes: [n1, n2 | _]} do
    # A name is any term: this one is 100 KB.
    name = {:tenant, String.duplicate("x", 100_000), System.unique_integer([:positive])}
    on_exit(fn -> Capsid.undeploy(name) end)
    {:ok, _} = Capsid.deploy(name, @v1, nodes: [n1, n2], size: 2)

    # 8 MB each way through distribution and both conversions.
    big = String.duplicate("é", 4_000_000)
    assert {:ok, reply} = Capsid.call(name, "hello", [big])
    assert byte_size(reply) == byte_size(big) + byte_size("Hello, !")

    # 200 processes, 20 calls each, spread over two nodes.
    results =
      1..200
      |> Task.async_stream(
        fn i -> for j <- 1..20, do: Capsid.call(name, "hello", ["c#{i}-#{j}"]) end,
        max_concurrency: 200,
        timeout: 60_000
      )
      |> Enum.flat_map(fn {:ok, rs} -> rs end)

    assert length(results) == 4_000
    assert Enum.all?(results, &match?({:ok, "Hello, c" <> _}, &1))
  end

  test "a remote pid that is not a live instance is :instance_down", %{nodes: [n1 | _]} do
    pid = Node.spawn(n1, Process, :sleep, [60_000])
    assert {:error, %Error{kind: :instance_down}} = Capsid.call(pid, "ok", [1])
    Process.exit(pid, :kill)
  end
end

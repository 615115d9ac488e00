defmodule Capsid.CallTest do
  use ExUnit.Case, async: true

  alias Capsid.Error
  import Capsid.TestHelpers

  doctest Capsid, except: [deploy: 3]

  setup do
    %{pid: start_toolkit()}
  end

  describe "function names" do
    test "root export by name", %{pid: pid} do
      assert Capsid.call(pid, "add", [1, 2]) == {:ok, 3}
      assert Capsid.call(pid, "add", [2_147_483_647, 1]) == {:ok, -2_147_483_648}
    end

    test "interface function by short, versionless and qualified name", %{pid: pid} do
      for name <- [
            "slugify",
            "acme:toolkit/text#slugify",
            "acme:toolkit/text@0.1.0#slugify"
          ] do
        assert Capsid.call(pid, name, ["Crème Brûlée"]) == {:ok, "creme-brulee"}, name
      end
    end

    test "an ambiguous short name lists the candidates", %{pid: pid} do
      assert {:error, %Error{kind: :unknown_function, message: msg}} =
               Capsid.call(pid, "describe", [])

      assert msg =~ "ambiguous"
      assert msg =~ "acme:toolkit/text@0.1.0#describe"
      assert msg =~ "acme:toolkit/pricing@0.1.0#describe"

      assert Capsid.call(pid, "acme:toolkit/pricing#describe", []) ==
               {:ok, "pricing: quotes with discounts and tax"}
    end

    test "an unknown name lists the exports", %{pid: pid} do
      assert {:error, %Error{kind: :unknown_function, message: msg}} =
               Capsid.call(pid, "subtract", [1, 2])

      assert msg =~ ~s(no exported function "subtract")
      # Names only, as short as a call may spell them, and not all 40.
      assert msg =~
               "add, greet, analyze, slugify, word-frequencies, " <>
                 "acme:toolkit/text@0.1.0#describe"

      refute msg =~ "func("
      assert msg =~ "and 28 more"
    end

    test "snake_case names resolve; a near miss gets \"did you mean\"", %{pid: pid} do
      assert Capsid.call(pid, "word_frequencies", ["a b a", 1]) == {:ok, [{"a", 2}]}

      assert {:error, %Error{kind: :unknown_function, message: msg}} =
               Capsid.call(pid, "word_frequency", ["a b a", 1])

      assert msg =~ ~s(did you mean "word-frequencies")
    end
  end

  describe "real logic" do
    test "text analysis", %{pid: pid} do
      assert {:ok, stats} = Capsid.call(pid, "analyze", ["The quick brown fox, the lazy dog!"])
      assert stats == %{words: 7, chars: 34, longest_word: "quick", unique_words: 6}

      assert Capsid.call(pid, "word-frequencies", ["b a b c a b", 2]) ==
               {:ok, [{"b", 3}, {"a", 2}]}
    end

    test "pricing with structured values", %{pid: pid} do
      items = [
        %{sku: "book", quantity: 2, unit_price_cents: 1500, tags: [:taxable, :discountable]},
        %{sku: "ebook", quantity: 1, unit_price_cents: 999, tags: [:digital]}
      ]

      assert {:ok, {:ok, quote}} = Capsid.call(pid, "quote", [items, {:percent, 10}, :eur])
      assert quote.subtotal_cents == 3999
      assert quote.discount_cents == 300
      assert quote.currency == :eur
      assert quote.total_cents == quote.subtotal_cents - quote.discount_cents + quote.tax_cents
      assert is_list(quote.warnings)

      assert Capsid.call(pid, "quote", [[], :none, :usd]) == {:ok, {:error, "empty basket"}}
      assert Capsid.call(pid, "divide", [7, 2]) == {:ok, {:ok, 3}}
      assert Capsid.call(pid, "divide", [7, 0]) == {:ok, {:error, "division by zero"}}
    end
  end

  describe "imports implemented in Elixir" do
    test "the guest calls log and get-config" do
      pid = start_toolkit(imports: toolkit_imports(self(), %{"greeting" => "Bonjour"}))

      assert Capsid.call(pid, "greet", ["Zoë"]) == {:ok, "Bonjour, Zoë!"}
      assert_receive {:guest_log, :info, "greeted Zoë"}
    end

    test "an import returning nil for an option", %{pid: pid} do
      assert Capsid.call(pid, "greet", ["Ann"]) == {:ok, "Hello, Ann!"}
    end

    test "an import returning a value of the wrong type traps as :import_failed" do
      pid = start_toolkit(imports: %{toolkit_imports() | "get-config" => fn _ -> 42 end})

      assert {:error, %Capsid.Trap{kind: :import_failed, message: msg}} =
               Capsid.call(pid, "greet", ["x"])

      assert msg =~ ~s(import "get-config" returned a bad value)
      assert msg =~ "result: expected string (a UTF-8 binary), got 42"
      assert Capsid.call(pid, "add", [1, 1]) == {:ok, 2}
    end

    test "a missing import is a link error naming it" do
      assert {:error, %Error{kind: :link, message: msg}} =
               Capsid.Instance.start_link(
                 component: toolkit(),
                 imports: Map.delete(toolkit_imports(), "get-config")
               )

      assert msg =~ "get-config"
      refute msg =~ ~s("log")
    end

    test "with strict_imports, an unknown import key raises; a wrong arity always does" do
      assert_raise ArgumentError, ~r/unknown import "lgo".*"log"/, fn ->
        Capsid.Instance.start_link(
          component: toolkit(),
          imports: %{"lgo" => fn _, _ -> :ok end},
          strict_imports: true
        )
      end

      assert_raise ArgumentError, ~r/import "log" takes 2 argument\(s\).*takes 1/, fn ->
        Capsid.Instance.start_link(
          component: toolkit(),
          imports: %{toolkit_imports() | "log" => fn _ -> :ok end}
        )
      end
    end
  end

  describe "bad input gives a clear error and the instance keeps answering" do
    defp assert_bad(pid, fun, args, pattern) do
      assert {:error, %Error{kind: :bad_argument, message: msg}} = Capsid.call(pid, fun, args)
      assert msg =~ pattern
      assert Capsid.call(pid, "add", [1, 2]) == {:ok, 3}
      msg
    end

    test "wrong arity", %{pid: pid} do
      assert_bad(
        pid,
        "add",
        [1],
        "wrong number of arguments: add takes 2 (add(a: s32, b: s32)), got 1"
      )

      assert_bad(pid, "noop", [1], "takes 0")
    end

    test "wrong type at the top", %{pid: pid} do
      assert_bad(pid, "add", [1, "2"], ~s(args[1]: expected s32, got "2"))
      assert_bad(pid, "echo-bool", [1], "args[0]: expected bool, got 1")
      assert_bad(pid, "echo-string", [:abc], "args[0]: expected string (a UTF-8 binary), got :abc")
    end

    test "wrong type deep inside, with the path", %{pid: pid} do
      nested = %{
        name: "n",
        points: [
          %{x: 1.0, y: 2.0, label_text: nil},
          %{x: 1.0, y: 2.0, label_text: nil},
          %{x: "a", y: 2.0, label_text: nil}
        ],
        shape: :empty,
        color: nil,
        perms: [],
        maybe_maybe: nil,
        outcome: :ok,
        pairs: []
      }

      assert_bad(
        pid,
        "echo-nested",
        [%{nested | outcome: {:ok, <<>>}}],
        ~s(args[0].points[2].x: expected f64, got "a")
      )

      # Kebab-case WIT fields are named as the caller wrote them.
      assert_bad(
        pid,
        "echo-nested",
        [%{nested | outcome: {:ok, <<>>}, points: [], maybe_maybe: {:some, "x"}}],
        ~s(args[0].maybe_maybe: expected u32, got "x")
      )

      assert_bad(
        pid,
        "echo-shape",
        [{:polygon, [%{x: 1.0, y: :no, label_text: nil}]}],
        "args[0](polygon)[0].y: expected f64"
      )

      assert_bad(
        pid,
        "echo-tuple",
        [{1, "x"}],
        "args[0]: expected tuple<u8, string, f64> (a tuple of 3)"
      )

      assert_bad(pid, "echo-tuple", [{1, 2, 3.0}], "args[0].1: expected string")
    end

    test "out-of-range integers", %{pid: pid} do
      assert_bad(pid, "echo-u8", [256], "args[0]: expected u8 (0..255), got 256")
      assert_bad(pid, "echo-u64", [-1], "expected u64 (0..18446744073709551615), got -1")
      assert_bad(pid, "echo-s64", [9_223_372_036_854_775_808], "expected s64")

      assert_bad(
        pid,
        "echo-u64",
        [18_446_744_073_709_551_616 * 1000],
        "expected u64 (0..18446744073709551615), got 18446744073709551616000"
      )

      assert_bad(pid, "echo-s8", [2 ** 200], "expected s8, got an integer out of range")
      assert_bad(pid, "echo-list", [[1, 2_147_483_648]], "args[0][1]: expected s32")
    end

    test "invalid UTF-8 and bad chars", %{pid: pid} do
      assert_bad(pid, "echo-string", [<<0xFF, 0xFE>>], "not valid UTF-8")
      assert_bad(pid, "echo-char", [0xD800], "Unicode scalar value")
      assert_bad(pid, "echo-char", ["a"], "expected char")
    end

    test "unknown and missing record keys", %{pid: pid} do
      assert_bad(pid, "echo-point", [%{x: 1.0, y: 2.0, label_text: nil, z: 3.0}], "unknown key :z")
      assert_bad(pid, "echo-point", [%{x: 1.0, label_text: nil}], "missing key :y")
      assert_bad(pid, "echo-point", [%{"x" => 1.0, y: 2.0, label_text: nil}], "missing key :x")
      assert_bad(pid, "echo-point", [[x: 1.0]], "expected a map")
    end

    test "unknown enum, variant and flag cases", %{pid: pid} do
      assert_bad(
        pid,
        "echo-color",
        [:purple],
        "unknown case :purple (expected enum of :red, :green, :blue, :dark_slate_gray)"
      )

      assert_bad(pid, "echo-shape", [{:triangle, 1.0}], "unknown case :triangle")
      assert_bad(pid, "echo-shape", [:circle], "case :circle carries a f64")
      assert_bad(pid, "echo-shape", [{:empty, 1}], "case :empty has no payload")
      assert_bad(pid, "echo-permissions", [[:read, :fly]], "unknown flag :fly")
    end

    test "option and result shapes", %{pid: pid} do
      assert_bad(pid, "echo-nested-option", ["x"], "as nil or {:some, value}")
      assert_bad(pid, "echo-result", [{:ok, "x"}], "args[0](ok): expected u32")
      assert_bad(pid, "echo-unit-result", [{:ok, 1}], "as :ok or :error")
    end

    test "non-list arguments and a non-string name", %{pid: pid} do
      assert {:error, %Error{kind: :bad_argument}} = Capsid.call(pid, "add", {1, 2})
      assert {:error, %Error{kind: :bad_argument}} = Capsid.call(pid, :add, [1, 2])
    end
  end

  test "call! raises the exception" do
    pid = start_toolkit()
    assert Capsid.call!(pid, "add", [20, 22]) == 42
    assert_raise Error, ~r/bad_argument/, fn -> Capsid.call!(pid, "add", [1]) end
  end
end
